//! What a container runs: the image config (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`,
//! `User`) with the request's overrides, resolved before the start. Docker's rules: a
//! request entrypoint replaces the image's entrypoint *and* cmd; request args replace the
//! cmd; request env entries override the image's.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::ContainerSpec;
use crate::spec::FieldError;

/// PATH when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ACCOUNT_FILE: u64 = 1 << 20;

/// A container's process, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Where `argv[0]` may be, in the order the exec tries them (a PATH search).
    pub program: Vec<PathBuf>,
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A lexically normalised absolute path without `..` (relative paths are rooted at `/`).
pub fn normalise(field: &str, p: &str) -> Result<PathBuf, FieldError> {
    let mut out = PathBuf::from("/");
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FieldError::new(field, format!("{p:?} contains '..'")));
            }
        }
    }
    Ok(out)
}

/// Resolves `spec` against the image `config` (the whole config blob). `layers` are the
/// image's layer directories, bottom first (for user names in /etc/passwd).
pub fn resolve(
    spec: &ContainerSpec,
    config: &serde_json::Value,
    layers: &[PathBuf],
) -> Result<Resolved, FieldError> {
    let c = &config["config"];
    let argv: Vec<String> = if !spec.entrypoint.is_empty() {
        spec.entrypoint.iter().chain(&spec.args).cloned().collect()
    } else {
        let cmd = if spec.args.is_empty() {
            strings(&c["Cmd"])
        } else {
            spec.args.clone()
        };
        strings(&c["Entrypoint"]).into_iter().chain(cmd).collect()
    };
    if argv.first().is_none_or(String::is_empty) {
        return Err(FieldError::new(
            "container.entrypoint",
            "the image has no entrypoint or cmd: give one",
        ));
    }
    let mut env: BTreeMap<String, String> = strings(&c["Env"])
        .into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty() && !kv.contains('\0')).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    let working_dir = match &spec.working_dir {
        Some(w) => normalise("container.working_dir", &w.to_string_lossy())?,
        None => normalise(
            "image config WorkingDir",
            c["WorkingDir"].as_str().unwrap_or("/"),
        )?,
    };
    bounded(spec, &argv, &env)?;
    let (uid, gid) = user(spec, c["User"].as_str().unwrap_or(""), layers)?;
    let path = env.get("PATH").cloned().unwrap_or_default();
    let program = program_candidates(&argv[0], &path, &working_dir);
    Ok(Resolved {
        argv,
        env: env.into_iter().collect(),
        working_dir,
        uid,
        gid,
        program,
    })
}

/// The resolved command and environment hold what an exec takes, within the bounds a
/// plain executable has (`MAX_ENTRIES` entries each, `MAX_ARG_BYTES` in all, no NUL):
/// the request's and the image config's together (an image's `Cmd` or `Env` is bounded
/// only by its config's size otherwise).
fn bounded(
    spec: &ContainerSpec,
    argv: &[String],
    env: &BTreeMap<String, String>,
) -> Result<(), FieldError> {
    use crate::spec::{MAX_ARG_BYTES, MAX_ENTRIES};
    let argv_field = if spec.entrypoint.is_empty() && spec.args.is_empty() {
        "image config Entrypoint and Cmd"
    } else {
        "container.args"
    };
    if argv.len() > MAX_ENTRIES {
        return Err(FieldError::new(
            argv_field,
            format!("{} arguments: more than {MAX_ENTRIES}", argv.len()),
        ));
    }
    if env.len() > MAX_ENTRIES {
        return Err(FieldError::new(
            "container.env",
            format!(
                "{} variables with the image config's Env: more than {MAX_ENTRIES}",
                env.len()
            ),
        ));
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(FieldError::new(
            format!("{argv_field} [{i}]"),
            "contains NUL",
        ));
    }
    let bytes = crate::spec::arg_bytes(argv, env);
    if bytes > MAX_ARG_BYTES {
        return Err(FieldError::new(
            argv_field,
            format!(
                "the command and environment (the image config's included) are {bytes} bytes: more than {MAX_ARG_BYTES}"
            ),
        ));
    }
    Ok(())
}

/// `argv[0]` itself when it has a '/', else each PATH directory joined with it.
fn program_candidates(argv0: &str, path: &str, cwd: &Path) -> Vec<PathBuf> {
    if argv0.contains('/') {
        return vec![cwd.join(argv0)];
    }
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(argv0))
        .collect()
}

/// uid and gid: the request's, else the image's `User` (`uid`, `uid:gid`, `name`,
/// `name:group`; names looked up in the image's /etc/passwd and /etc/group). Every id is
/// checked as the kernel will use it ([`crate::spec::id`]): an image `User` of
/// `4294967295` is "-1" to set*id and would keep auraed's uid 0. A passwd or group line
/// whose id field is not a number is an error, never uid/gid 0.
fn user(
    spec: &ContainerSpec,
    image_user: &str,
    layers: &[PathBuf],
) -> Result<(u32, u32), FieldError> {
    let field = "image config User";
    let (u, g) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let passwd = || read_from_layers(layers, "etc/passwd");
    let number = |what: &str, s: Option<&&str>| -> Result<u32, FieldError> {
        let s = s.copied().unwrap_or("");
        let n: u32 = s
            .parse()
            .map_err(|_| FieldError::new(field, format!("{what}: {s:?} is not a numeric id")))?;
        crate::spec::id(field, n)
    };
    let (mut uid, mut gid) = (0, 0);
    if spec.uid.is_none() && !u.is_empty() {
        match u.parse::<u32>() {
            Ok(n) => {
                uid = crate::spec::id(field, n)?;
                // The primary group of the passwd line with this uid, if there is one.
                let line_gid: Option<String> = passwd().and_then(|p| {
                    account(&p, |f| f.get(2) == Some(&u))
                        .map(|f| f.get(3).copied().unwrap_or("").to_owned())
                });
                gid = match line_gid {
                    Some(g) => number(
                        &format!("the gid of uid {n} in the image's /etc/passwd"),
                        Some(&g.as_str()),
                    )?,
                    None => 0,
                };
            }
            Err(_) => {
                let p = passwd().ok_or_else(|| {
                    FieldError::new(field, format!("user {u:?}: the image has no /etc/passwd"))
                })?;
                let f = account(&p, |f| f.first() == Some(&u)).ok_or_else(|| {
                    FieldError::new(
                        field,
                        format!("user {u:?} is not in the image's /etc/passwd"),
                    )
                })?;
                uid = number(&format!("the uid of user {u:?}"), f.get(2))?;
                gid = number(&format!("the gid of user {u:?}"), f.get(3))?;
            }
        }
    }
    if let Some(g) = g.filter(|g| !g.is_empty() && spec.gid.is_none()) {
        gid = match g.parse::<u32>() {
            Ok(n) => crate::spec::id(field, n)?,
            Err(_) => {
                let groups = read_from_layers(layers, "etc/group").ok_or_else(|| {
                    FieldError::new(field, format!("group {g:?}: the image has no /etc/group"))
                })?;
                let f = account(&groups, |f| f.first() == Some(&g)).ok_or_else(|| {
                    FieldError::new(
                        field,
                        format!("group {g:?} is not in the image's /etc/group"),
                    )
                })?;
                number(&format!("the gid of group {g:?}"), f.get(2))?
            }
        };
    }
    let uid = spec.uid.unwrap_or(uid);
    // An explicit uid without gid takes the same number, as for executables.
    let gid = spec
        .gid
        .unwrap_or(if spec.uid.is_some() { uid } else { gid });
    Ok((crate::spec::id("uid", uid)?, crate::spec::id("gid", gid)?))
}

/// The fields of the first line of a colon-separated account file matching `f`.
fn account<'a>(text: &'a str, f: impl Fn(&Vec<&'a str>) -> bool) -> Option<Vec<&'a str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|fields| f(fields))
}

/// A small file of the image (topmost layer that has it), read inside each layer's root
/// (`openat2(RESOLVE_IN_ROOT)`: a symlink in the image cannot lead to a host file). A
/// whiteout (or anything but a regular file) in a higher layer hides lower ones.
pub fn read_from_layers(layers: &[PathBuf], rel: &str) -> Option<String> {
    use std::io::Read;
    for dir in layers.iter().rev() {
        let Ok(root) = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let Ok(st) = rustix::fs::statat(&root, rel, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
        {
            return None;
        }
        let fd = rustix::fs::openat2(
            &root,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
        .ok()?;
        let file = std::fs::File::from(fd);
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut s = String::new();
        file.take(MAX_ACCOUNT_FILE).read_to_string(&mut s).ok()?;
        return Some(s);
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "x".into(),
            entrypoint: vec![],
            args: vec![],
            env: BTreeMap::new(),
            working_dir: None,
            uid: None,
            gid: None,
            read_only_root: false,
            volumes: vec![],
            no_new_privileges: false,
            dns: None,
            files: vec![],
            cell_dirs: vec![],
        }
    }

    fn config(v: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "config": v })
    }

    #[test]
    fn docker_override_rules() {
        let img = config(serde_json::json!({
            "Entrypoint": ["/bin/ep"], "Cmd": ["a", "b"], "Env": ["PATH=/bin", "X=1"],
            "WorkingDir": "/srv"
        }));
        let r = resolve(&spec(), &img, &[]).unwrap();
        assert_eq!(r.argv, ["/bin/ep", "a", "b"]);
        assert_eq!(r.working_dir, Path::new("/srv"));
        assert_eq!(r.program, [PathBuf::from("/bin/ep")]);
        let mut s = spec();
        s.args = vec!["c".into()];
        assert_eq!(resolve(&s, &img, &[]).unwrap().argv, ["/bin/ep", "c"]);
        let mut s = spec();
        s.entrypoint = vec!["sh".into()];
        s.env.insert("X".into(), "2".into());
        let r = resolve(&s, &img, &[]).unwrap();
        assert_eq!(
            r.argv,
            ["sh"],
            "an entrypoint override drops the image's cmd"
        );
        assert_eq!(r.program, [PathBuf::from("/bin/sh")]);
        assert!(r.env.contains(&("X".into(), "2".into())));
        let none = config(serde_json::json!({}));
        let e = resolve(&spec(), &none, &[]).unwrap_err();
        assert_eq!(e.field, "container.entrypoint");
        let r = resolve(&s, &none, &[]).unwrap();
        assert_eq!(r.program.len(), 6, "default PATH searched");
        assert_eq!((r.uid, r.gid), (0, 0));
    }

    /// The image's Cmd and Env count with the request's against a plain executable's
    /// bounds; a NUL in the image's Cmd is refused here, naming where it came from.
    #[test]
    fn the_command_and_environment_are_bounded_with_the_images() {
        let many: Vec<String> = (0..5000).map(|i| format!("a{i}")).collect();
        let img = config(serde_json::json!({ "Cmd": many }));
        let e = resolve(&spec(), &img, &[]).unwrap_err();
        assert_eq!(e.field, "image config Entrypoint and Cmd", "{e:?}");
        let env: Vec<String> = (0..5000).map(|i| format!("V{i}=1")).collect();
        let img = config(serde_json::json!({ "Cmd": ["/x"], "Env": env }));
        assert_eq!(
            resolve(&spec(), &img, &[]).unwrap_err().field,
            "container.env"
        );
        let big = "x".repeat(200 * 1024);
        let img = config(serde_json::json!({ "Cmd": ["/x"], "Env": [format!("BIG={big}")] }));
        let mut s = spec();
        s.args = vec![big.clone()];
        assert_eq!(resolve(&s, &img, &[]).unwrap_err().field, "container.args");
        let img = config(serde_json::json!({ "Cmd": ["/x", "a\u{0}b"] }));
        let e = resolve(&spec(), &img, &[]).unwrap_err();
        assert!(e.field.contains("[1]") && e.reason.contains("NUL"), "{e:?}");
        let img = config(serde_json::json!({ "Cmd": ["/x"], "Env": [format!("BIG={big}")] }));
        assert!(resolve(&spec(), &img, &[]).is_ok(), "within the bounds");
    }

    #[test]
    fn working_dir_never_climbs() {
        let img = config(serde_json::json!({"Cmd": ["/x"], "WorkingDir": "/a/../../etc"}));
        assert!(resolve(&spec(), &img, &[]).is_err());
        let img = config(serde_json::json!({"Cmd": ["/x"], "WorkingDir": "rel/dir"}));
        assert_eq!(
            resolve(&spec(), &img, &[]).unwrap().working_dir,
            Path::new("/rel/dir")
        );
    }

    #[test]
    fn users_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let l1 = dir.path().join("l1");
        std::fs::create_dir_all(l1.join("etc")).unwrap();
        std::fs::write(
            l1.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(l1.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let layers = [l1.clone()];
        let with_user = |u: &str| config(serde_json::json!({"Cmd": ["/x"], "User": u}));
        let r = |u: &str| resolve(&spec(), &with_user(u), &layers).map(|r| (r.uid, r.gid));
        assert_eq!(r("web").unwrap(), (1000, 1001));
        assert_eq!(r("1000").unwrap(), (1000, 1001));
        assert_eq!(r("7").unwrap(), (7, 0));
        assert_eq!(r("web:staff").unwrap(), (1000, 50));
        assert_eq!(r("5:6").unwrap(), (5, 6));
        assert!(r("nobody").is_err());
        assert!(r("web:nogroup").is_err());
        // The attack: "-1" to set*id keeps auraed's uid 0.
        for evil in ["4294967295", "2147483648", "0:4294967295", "5:2147483648"] {
            let e = r(evil).unwrap_err();
            assert_eq!(e.field, "image config User", "{evil}: {e}");
            assert!(e.to_string().contains("not a valid id"), "{evil}: {e}");
        }
        // A passwd line with a broken id field is an error, never uid 0.
        let l2 = dir.path().join("broken");
        std::fs::create_dir_all(l2.join("etc")).unwrap();
        std::fs::write(
            l2.join("etc/passwd"),
            "evil:x:notanumber:1::/:/bin/sh\nhuge:x:4294967295:1::/:/bin/sh\nbadgid:x:9:-1::/:/bin/sh\n",
        )
        .unwrap();
        let layers2 = [l2];
        let r2 = |u: &str| resolve(&spec(), &with_user(u), &layers2).map(|r| (r.uid, r.gid));
        for evil in ["evil", "huge", "badgid"] {
            assert!(r2(evil).is_err(), "{evil}: {:?}", r2(evil));
        }
        let mut s = spec();
        s.uid = Some(42);
        assert_eq!(
            resolve(&s, &with_user("web"), &layers)
                .map(|r| (r.uid, r.gid))
                .unwrap(),
            (42, 42)
        );
        // A symlinked /etc/passwd pointing at the host's is read inside the layer.
        let l2 = dir.path().join("l2");
        std::fs::create_dir_all(l2.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", l2.join("etc/passwd")).unwrap();
        let layers = [l1, l2];
        assert!(read_from_layers(&layers, "etc/passwd").is_none_or(|p| p.contains("web:x:1000")));
    }
}
