//! The validated `Container` of a request (RunCell, sidecars, RunPod).

use std::collections::BTreeMap;

use aurae_proto::runtime::v0 as pb;

use crate::spec::{FieldError, abs_path, id};

/// A container to run in a cell (RunCell, RunPod).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<std::path::PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub read_only_root: bool,
    pub volumes: Vec<(std::path::PathBuf, std::path::PathBuf, bool)>,
    /// Asked for no_new_privs whatever the grant allows.
    pub no_new_privileges: bool,
    /// The container's `/etc/resolv.conf`; none: the image's.
    #[serde(default)]
    pub dns: Option<Dns>,
    /// Files written into its private directory and mounted over their paths.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Directories of its cell mounted over their paths.
    #[serde(default)]
    pub cell_dirs: Vec<CellDirSpec>,
}

/// One of [`ContainerSpec::cell_dirs`]: a directory of the container's cell (see
/// the cell module's `dirs`) mounted at `path`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CellDirSpec {
    /// A DNS label.
    pub name: String,
    /// Absolute (checked as a volume's target when the plan is made).
    pub path: std::path::PathBuf,
    pub read_only: bool,
}

/// Most cell directories one container may name.
pub const MAX_CELL_DIRS: usize = 16;

/// [`pb::CellDirectory`]s checked: at most [`MAX_CELL_DIRS`]; names are DNS labels (one
/// may be mounted at several paths, as a pod's volume may); paths absolute, each used once.
pub fn parse_cell_dirs(
    field: &str,
    dirs: &[pb::CellDirectory],
) -> Result<Vec<CellDirSpec>, FieldError> {
    if dirs.len() > MAX_CELL_DIRS {
        return Err(FieldError::new(
            format!("{field}.cell_directories"),
            format!("more than {MAX_CELL_DIRS}"),
        ));
    }
    let mut out: Vec<CellDirSpec> = Vec::new();
    let mut paths = std::collections::HashSet::new();
    for (i, d) in dirs.iter().enumerate() {
        let f = |x: &str| format!("{field}.cell_directories[{i}].{x}");
        if let Some(r) = crate::spec::label_reason(&d.name) {
            return Err(FieldError::new(
                f("name"),
                format!("{:?} {r} (a cell directory's name is a DNS label)", d.name),
            ));
        }
        let path = abs_path(&f("path"), &d.path)?;
        if !paths.insert(path.clone()) {
            return Err(FieldError::new(
                f("path"),
                format!("{} is used twice", path.display()),
            ));
        }
        out.push(CellDirSpec {
            name: d.name.clone(),
            path,
            read_only: d.read_only,
        });
    }
    Ok(out)
}

/// One of [`ContainerSpec::files`]: a file, or a directory of files (`entries`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSpec {
    /// Absolute (checked as a volume's target when the plan is made).
    pub path: std::path::PathBuf,
    pub content: Vec<u8>,
    /// Permission bits (at most 0o777).
    pub mode: u32,
    pub read_only: bool,
    /// A directory's files: (relative name, content, mode); empty for a file.
    pub entries: Vec<(std::path::PathBuf, Vec<u8>, u32)>,
    /// A directory, also with no entries.
    #[serde(default)]
    pub directory: bool,
}

impl FileSpec {
    /// A directory (`directory`, or entries given), else a file.
    pub fn is_dir(&self) -> bool {
        self.directory || !self.entries.is_empty()
    }
}

/// Most files or directories a container may be given (each a mount).
pub const MAX_FILES: usize = 16;
/// Most directory entries, together.
pub const MAX_FILE_ENTRIES: usize = 256;
/// Most bytes of content, together.
pub const MAX_FILE_BYTES: usize = 512 << 10;

/// A mode from a request: permission bits only; 0 is 0644.
fn file_mode(field: String, mode: u32) -> Result<u32, FieldError> {
    match mode {
        0 => Ok(0o644),
        m if m <= 0o777 => Ok(m),
        m => Err(FieldError::new(
            field,
            format!("{m:#o} is more than permission bits (0777)"),
        )),
    }
}

/// A directory entry's name: plain components, at most 4 deep.
fn entry_name(field: String, name: &str) -> Result<std::path::PathBuf, FieldError> {
    let parts: Vec<&str> = name.split('/').collect();
    let ok = !name.is_empty()
        && name.len() <= 255
        && parts.len() <= 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && !p.starts_with("..") && !p.contains('\0'));
    if !ok {
        return Err(FieldError::new(
            field,
            format!(
                "{name:?} is not a relative name (plain names separated by '/', at most 4 deep, none starting with \"..\": those are the directory's own)"
            ),
        ));
    }
    Ok(std::path::PathBuf::from(name))
}

/// The files of a container (`{field}.files`), checked: at most [`MAX_FILES`], entries
/// and bytes bounded, names relative (plain components, none starting with ".."), modes
/// permission bits.
pub fn parse_files(field: &str, files: &[pb::ContainerFile]) -> Result<Vec<FileSpec>, FieldError> {
    let given = files;
    if given.len() > MAX_FILES {
        return Err(FieldError::new(
            format!("{field}.files"),
            format!("more than {MAX_FILES}"),
        ));
    }
    let entries: usize = given.iter().map(|f| f.entries.len()).sum();
    if entries > MAX_FILE_ENTRIES {
        return Err(FieldError::new(
            format!("{field}.files"),
            format!("{entries} directory entries together, more than {MAX_FILE_ENTRIES}"),
        ));
    }
    let total: usize = given
        .iter()
        .map(|f| f.content.len() + f.entries.iter().map(|e| e.content.len()).sum::<usize>())
        .sum();
    if total > MAX_FILE_BYTES {
        return Err(FieldError::new(
            format!("{field}.files"),
            format!("{total} bytes together, more than {MAX_FILE_BYTES}"),
        ));
    }
    let mut files = Vec::new();
    for (i, f) in given.iter().enumerate() {
        let at = |n: &str| format!("{field}.files[{i}].{n}");
        if (f.directory || !f.entries.is_empty()) && !f.content.is_empty() {
            return Err(FieldError::new(
                at("content"),
                "a directory (entries) has no content of its own",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut dir = Vec::new();
        for (j, e) in f.entries.iter().enumerate() {
            let name = entry_name(at(&format!("entries[{j}].name")), &e.name)?;
            if !seen.insert(name.clone()) {
                return Err(FieldError::new(
                    at(&format!("entries[{j}].name")),
                    format!("{:?} is given twice", e.name),
                ));
            }
            let mode = file_mode(at(&format!("entries[{j}].mode")), e.mode)?;
            dir.push((name, e.content.clone(), mode));
        }
        // A name that is also another's directory ("a" and "a/b") cannot be both.
        for (name, _, _) in &dir {
            if seen.iter().any(|o| o != name && o.starts_with(name)) {
                return Err(FieldError::new(
                    at("entries"),
                    format!("{} is a file and a directory", name.display()),
                ));
            }
        }
        files.push(FileSpec {
            path: abs_path(&at("path"), &f.path)?,
            content: f.content.clone(),
            mode: file_mode(at("mode"), f.mode)?,
            read_only: f.read_only,
            entries: dir,
            directory: f.directory,
        });
    }
    Ok(files)
}

/// DNS settings, checked as what the resolver will read: one token per value, nothing that
/// could start a new line or directive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dns {
    pub servers: Vec<std::net::IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Most name servers glibc's and musl's resolvers read (`MAXNS`).
const MAX_DNS_SERVERS: usize = 3;
const MAX_DNS_SEARCHES: usize = 32;
const MAX_DNS_OPTIONS: usize = 16;

impl Dns {
    pub fn parse(field: &str, d: &pb::ContainerDns) -> Result<Self, FieldError> {
        if d.servers.len() > MAX_DNS_SERVERS {
            return Err(FieldError::new(
                format!("{field}.servers"),
                format!("more than {MAX_DNS_SERVERS} (the resolver reads no more)"),
            ));
        }
        let servers = d
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<std::net::IpAddr>().map_err(|_| {
                    FieldError::new(
                        format!("{field}.servers[{i}]"),
                        format!("{s:?} is not an IP address"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if d.searches.len() > MAX_DNS_SEARCHES {
            return Err(FieldError::new(
                format!("{field}.searches"),
                format!("more than {MAX_DNS_SEARCHES}"),
            ));
        }
        for (i, s) in d.searches.iter().enumerate() {
            let name = s.strip_suffix('.').unwrap_or(s);
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ok {
                return Err(FieldError::new(
                    format!("{field}.searches[{i}]"),
                    format!("{s:?} is not a DNS name"),
                ));
            }
        }
        if d.options.len() > MAX_DNS_OPTIONS {
            return Err(FieldError::new(
                format!("{field}.options"),
                format!("more than {MAX_DNS_OPTIONS}"),
            ));
        }
        for (i, o) in d.options.iter().enumerate() {
            if o.is_empty()
                || o.len() > 64
                || !o
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b))
            {
                return Err(FieldError::new(
                    format!("{field}.options[{i}]"),
                    format!("{o:?} is not a resolver option (one word, [A-Za-z0-9._:+-])"),
                ));
            }
        }
        Ok(Self {
            servers,
            searches: d.searches.clone(),
            options: d.options.clone(),
        })
    }
}

impl ContainerSpec {
    pub fn parse(field: &str, c: Option<pb::Container>) -> Result<Self, FieldError> {
        let c = c.ok_or_else(|| FieldError::new(field, "is missing: give at least an image"))?;
        if c.image.is_empty()
            || c.image.len() > 1024
            || c.image.chars().any(|ch| ch.is_whitespace() || ch == '\0')
        {
            return Err(FieldError::new(
                format!("{field}.image"),
                format!("{:?} is not an image reference", c.image),
            ));
        }
        for (k, v) in &c.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(FieldError::new(
                    format!("{field}.env[{k:?}]"),
                    "invalid variable name or value",
                ));
            }
        }
        // The request's own share, before any pull (with the image's: `config::bounded`).
        {
            use crate::spec::{MAX_ARG_BYTES, MAX_ENTRIES};
            let bytes = crate::spec::arg_bytes(c.entrypoint.iter().chain(&c.args), &c.env);
            if c.entrypoint.len() + c.args.len() > MAX_ENTRIES
                || c.env.len() > MAX_ENTRIES
                || bytes > MAX_ARG_BYTES
            {
                return Err(FieldError::new(
                    format!("{field}.args"),
                    format!(
                        "more than {MAX_ENTRIES} arguments or variables, or more than {MAX_ARG_BYTES} bytes of them"
                    ),
                ));
            }
        }
        if c.entrypoint.iter().chain(&c.args).any(|a| a.contains('\0')) {
            return Err(FieldError::new(
                format!("{field}.args"),
                "an argument contains NUL",
            ));
        }
        let working_dir = if c.working_dir.is_empty() {
            None
        } else {
            Some(abs_path(&format!("{field}.working_dir"), &c.working_dir)?)
        };
        let files = parse_files(field, &c.files)?;
        let mut volumes = Vec::new();
        for (i, v) in c.volumes.iter().enumerate() {
            volumes.push((
                abs_path(&format!("{field}.volumes[{i}].host_path"), &v.host_path)?,
                abs_path(
                    &format!("{field}.volumes[{i}].container_path"),
                    &v.container_path,
                )?,
                v.read_only,
            ));
        }
        Ok(Self {
            image: c.image,
            entrypoint: c.entrypoint,
            args: c.args,
            env: c.env.into_iter().collect(),
            working_dir,
            uid: c.uid.map(|v| id(&format!("{field}.uid"), v)).transpose()?,
            gid: c.gid.map(|v| id(&format!("{field}.gid"), v)).transpose()?,
            read_only_root: c.read_only_root,
            volumes,
            no_new_privileges: c.no_new_privileges,
            dns: c
                .dns
                .as_ref()
                .map(|d| Dns::parse(&format!("{field}.dns"), d))
                .transpose()?,
            files,
            cell_dirs: parse_cell_dirs(field, &c.cell_directories)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    fn with_files(files: Vec<pb::ContainerFile>) -> Result<ContainerSpec, FieldError> {
        ContainerSpec::parse(
            "container",
            Some(pb::Container {
                image: "reg/x:1".into(),
                files,
                ..Default::default()
            }),
        )
    }

    fn entry(name: &str) -> pb::DirectoryEntry {
        pb::DirectoryEntry {
            name: name.into(),
            content: b"x".to_vec(),
            mode: 0,
        }
    }

    /// A request's arguments and variables are bounded before any pull, as a plain
    /// executable's are.
    #[test]
    fn a_containers_arguments_are_bounded() {
        let c = |args: Vec<String>| {
            ContainerSpec::parse(
                "container",
                Some(pb::Container {
                    image: "reg/x:1".into(),
                    args,
                    ..Default::default()
                }),
            )
        };
        let many = (0..5000).map(|i| i.to_string()).collect();
        assert_eq!(c(many).unwrap_err().field, "container.args");
        assert_eq!(
            c(vec!["x".repeat(300 * 1024)]).unwrap_err().field,
            "container.args"
        );
        assert!(c(vec!["x".repeat(1024)]).is_ok());
    }

    #[test]
    fn cell_directories_are_named_by_labels_once_each() {
        let with = |dirs: Vec<(&str, &str)>| {
            ContainerSpec::parse(
                "container",
                Some(pb::Container {
                    image: "reg/x:1".into(),
                    cell_directories: dirs
                        .into_iter()
                        .map(|(name, path)| pb::CellDirectory {
                            name: name.into(),
                            path: path.into(),
                            read_only: false,
                        })
                        .collect(),
                    ..Default::default()
                }),
            )
        };
        let ok = with(vec![
            ("cache", "/cache"),
            ("scratch", "/var/tmp/s"),
            ("cache", "/also/cache"),
        ])
        .unwrap();
        assert_eq!(ok.cell_dirs.len(), 3);
        let many: Vec<(String, String)> = (0..17)
            .map(|i| (format!("d{i}"), format!("/d{i}")))
            .collect();
        let e = with(many.iter().map(|(n, p)| (n.as_str(), p.as_str())).collect()).unwrap_err();
        assert_eq!(e.field, "container.cell_directories", "{e:?}");
        assert_eq!(ok.cell_dirs[1].path, std::path::Path::new("/var/tmp/s"));
        for (dirs, field) in [
            (vec![("", "/c")], "container.cell_directories[0].name"),
            (vec![("_dir", "/c")], "container.cell_directories[0].name"),
            (vec![("a/b", "/c")], "container.cell_directories[0].name"),
            (vec![("..", "/c")], "container.cell_directories[0].name"),
            (
                vec![("c", "relative")],
                "container.cell_directories[0].path",
            ),
            (
                vec![("c", "/a"), ("d", "/a")],
                "container.cell_directories[1].path",
            ),
        ] {
            let e = with(dirs.clone()).unwrap_err();
            assert_eq!(e.field, field, "{dirs:?}: {e:?}");
        }
    }

    #[test]
    fn files_are_checked_as_what_will_be_written() {
        let ok = with_files(vec![
            pb::ContainerFile {
                path: "/etc/hosts".into(),
                content: b"127.0.0.1 localhost\n".to_vec(),
                ..Default::default()
            },
            pb::ContainerFile {
                path: "/var/run/secrets/sa".into(),
                entries: vec![entry("token"), entry("conf/app.yaml")],
                read_only: true,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(ok.files[0].mode, 0o644);
        assert_eq!(ok.files[1].entries.len(), 2);
        let file = |path: &str, mode: u32, entries: Vec<pb::DirectoryEntry>| pb::ContainerFile {
            path: path.into(),
            mode,
            entries,
            ..Default::default()
        };
        for (files, field) in [
            (vec![file("rel", 0, vec![])], "container.files[0].path"),
            (vec![file("/a", 0o4755, vec![])], "container.files[0].mode"),
            (
                vec![file("/a", 0, vec![entry("../x")])],
                "container.files[0].entries[0].name",
            ),
            (
                vec![file("/a", 0, vec![entry("/abs")])],
                "container.files[0].entries[0].name",
            ),
            // The directory's own names (its atomic layout) are not an entry's.
            (
                vec![file("/a", 0, vec![entry("..data")])],
                "container.files[0].entries[0].name",
            ),
            (
                vec![file("/a", 0, vec![entry("x/..v2")])],
                "container.files[0].entries[0].name",
            ),
            (
                vec![file("/a", 0, vec![entry("a/b/c/d/e")])],
                "container.files[0].entries[0].name",
            ),
            (
                vec![file("/a", 0, vec![entry("x"), entry("x")])],
                "container.files[0].entries[1].name",
            ),
            (
                vec![file("/a", 0, vec![entry("x"), entry("x/y")])],
                "container.files[0].entries",
            ),
            (
                vec![pb::ContainerFile {
                    path: "/a".into(),
                    content: b"x".to_vec(),
                    entries: vec![entry("y")],
                    ..Default::default()
                }],
                "container.files[0].content",
            ),
            (
                (0..17).map(|_| file("/a", 0, vec![])).collect(),
                "container.files",
            ),
            (
                vec![pb::ContainerFile {
                    path: "/big".into(),
                    content: vec![0; MAX_FILE_BYTES + 1],
                    ..Default::default()
                }],
                "container.files",
            ),
        ] {
            let e = with_files(files).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }
}
