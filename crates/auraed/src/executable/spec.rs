//! Validated executable requests.

use std::path::PathBuf;

use aurae_proto::runtime::v0 as pb;

use crate::{
    container::ContainerSpec,
    spec::{CellName, FieldError, Label, abs_path, id},
    workload::limits::Limits,
};

pub use crate::spec::{MAX_ARG_BYTES, MAX_ENTRIES};
/// Most bytes of stdin a request may carry.
pub const MAX_STDIN: usize = 512 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableSpec {
    pub cell: CellName,
    /// `None`: auraed picks a name.
    pub name: Option<Label>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub stdin: Vec<u8>,
    /// Run without `no_new_privs` (setuid programs and file capabilities work). Never
    /// from the request: set from the caller's grant (`allow_new_privileges`).
    pub allow_new_privileges: bool,
    /// May start in a cell tree that already runs the other kind (container vs plain
    /// executable). Never from the request: set from the caller's grant
    /// (`allow_host_namespaces`, since a plain executable sees the host's files).
    pub allow_mixed_cell: bool,
    /// What goes once it has ended (a run call's `remove`), recorded with it from its
    /// first record on.
    pub free_on_exit: Option<super::FreeOnExit>,
    /// Run as a container from an image: argv, env, working_dir, uid and gid are filled
    /// in from the image and this spec before the start (see [`crate::container`]).
    pub container: Option<ContainerSpec>,
    /// Its input comes later, through Attach (see [`Interactive`]).
    pub interactive: Interactive,
    /// A cgroup of its own below its cell's, with these limits (`Executable.limits`).
    pub limits: Option<Box<Limits>>,
}

/// An executable's own limits (`field`): validated as a cell's are, except that
/// `memory_oom_group` is off unless asked for (an OOM kill takes one process, as in a
/// cell's group).
pub fn own_limits(field: &str, l: Option<pb::CellLimits>) -> Result<Option<Limits>, FieldError> {
    let Some(l) = l else { return Ok(None) };
    let oom_group = l.memory_oom_group.unwrap_or(false);
    // No bound from this machine's CPU count: the kernel takes a quota above it (as runc
    // writes Kubernetes limits above a node's, or a microVM's single vCPU).
    let mut parsed = Limits::parse(field, Some(l), u64::MAX)?;
    parsed.memory_oom_group = oom_group;
    Ok(Some(parsed))
}

/// How a process's input is wired when it comes through Attach rather than the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Interactive {
    /// Its stdin is a pipe auraed holds open.
    pub stdin: bool,
    /// Its stdin is closed when the first attach that wrote to it ends.
    pub stdin_once: bool,
    /// A pseudo-terminal for its stdio (and its controlling terminal).
    pub tty: bool,
}

impl Interactive {
    /// Parses the request's `interactive`, given whether `stdin` bytes came too.
    pub fn parse(i: Option<pb::Interactive>, stdin_bytes: bool) -> Result<Self, FieldError> {
        let Some(i) = i else {
            return Ok(Self::default());
        };
        if i.stdin_once && !i.stdin {
            return Err(FieldError::new(
                "interactive.stdin_once",
                "closes a kept-open stdin: set interactive.stdin too",
            ));
        }
        if stdin_bytes && (i.stdin || i.tty) {
            return Err(FieldError::new(
                "stdin",
                "bytes for stdin and an interactive stdin or terminal exclude each other",
            ));
        }
        Ok(Self {
            stdin: i.stdin,
            stdin_once: i.stdin_once,
            tty: i.tty,
        })
    }

    /// Whether anything of it is asked for.
    pub fn any(&self) -> bool {
        self.stdin || self.tty
    }
}

impl TryFrom<pb::Executable> for ExecutableSpec {
    type Error = FieldError;

    fn try_from(e: pb::Executable) -> Result<Self, FieldError> {
        let cell = CellName::parse("cell", &e.cell)?;
        let name = if e.name.is_empty() {
            None
        } else {
            Some(Label::parse("name", &e.name)?)
        };
        if e.container.is_some() {
            for (field, given) in [
                ("argv", !e.argv.is_empty()),
                ("env", !e.env.is_empty()),
                ("working_dir", !e.working_dir.is_empty()),
                ("uid", e.uid.is_some()),
                ("gid", e.gid.is_some()),
            ] {
                if given {
                    return Err(FieldError::new(
                        field,
                        "must be empty for a container: give it in container (entrypoint, args, env, working_dir, uid, gid)",
                    ));
                }
            }
            if e.stdin.len() > MAX_STDIN {
                return Err(FieldError::new(
                    "stdin",
                    format!("is larger than {MAX_STDIN} bytes"),
                ));
            }
            let interactive = Interactive::parse(e.interactive, !e.stdin.is_empty())?;
            return Ok(Self {
                cell,
                name,
                argv: Vec::new(),
                env: Vec::new(),
                working_dir: PathBuf::from("/"),
                uid: None,
                gid: None,
                interactive,
                stdin: e.stdin,
                allow_new_privileges: false,
                allow_mixed_cell: false,
                free_on_exit: None,
                container: Some(ContainerSpec::parse("container", e.container)?),
                limits: own_limits("limits", e.limits)?.map(Box::new),
            });
        }
        let first = e.argv.first().ok_or_else(|| {
            FieldError::new("argv", "is empty: give the program's absolute path first")
        })?;
        abs_path("argv[0]", first)?;
        if e.argv.len() > MAX_ENTRIES || e.env.len() > MAX_ENTRIES {
            return Err(FieldError::new(
                "argv",
                format!("more than {MAX_ENTRIES} arguments or environment entries"),
            ));
        }
        for (i, a) in e.argv.iter().enumerate() {
            if a.contains('\0') {
                return Err(FieldError::new(format!("argv[{i}]"), "contains NUL"));
            }
        }
        let mut env: Vec<(String, String)> = e.env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(FieldError::new(
                    format!("env[{k:?}]"),
                    "a variable name must be non-empty, without '=' or NUL",
                ));
            }
            if v.contains('\0') {
                return Err(FieldError::new(
                    format!("env[{k:?}]"),
                    "the value contains NUL",
                ));
            }
        }
        if crate::spec::arg_bytes(&e.argv, env.iter().map(|(k, v)| (k, v))) > MAX_ARG_BYTES {
            return Err(FieldError::new(
                "argv",
                format!("argv and env together exceed {MAX_ARG_BYTES} bytes"),
            ));
        }
        let working_dir = if e.working_dir.is_empty() {
            PathBuf::from("/")
        } else {
            abs_path("working_dir", &e.working_dir)?
        };
        if e.stdin.len() > MAX_STDIN {
            return Err(FieldError::new(
                "stdin",
                format!("is larger than {MAX_STDIN} bytes"),
            ));
        }
        let interactive = Interactive::parse(e.interactive, !e.stdin.is_empty())?;
        Ok(Self {
            cell,
            name,
            argv: e.argv,
            env,
            working_dir,
            interactive,
            uid: e.uid.map(|v| id("uid", v)).transpose()?,
            gid: e.gid.map(|v| id("gid", v)).transpose()?,
            stdin: e.stdin,
            allow_new_privileges: false,
            allow_mixed_cell: false,
            free_on_exit: None,
            container: None,
            limits: own_limits("limits", e.limits)?.map(Box::new),
        })
    }
}

impl ExecutableSpec {
    /// Fills the command, environment, directory and user from a container's plan.
    pub fn apply_plan(&mut self, plan: &crate::container::Plan) {
        self.argv = plan.process.argv.clone();
        self.env = plan.process.env.clone();
        self.working_dir = plan.process.working_dir.clone();
        self.uid = Some(plan.process.uid);
        self.gid = Some(plan.process.gid);
    }
}

/// One executable, by cell and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExecutableRef {
    pub cell: CellName,
    pub name: Label,
}

impl ExecutableRef {
    /// Parses the `field` of a request holding an `ExecutableRef`.
    pub fn parse(field: &str, r: Option<&pb::ExecutableRef>) -> Result<Self, FieldError> {
        let r = r.ok_or_else(|| FieldError::new(field, "is missing"))?;
        Ok(Self {
            cell: CellName::parse(&format!("{field}.cell"), &r.cell)?,
            name: Label::parse(&format!("{field}.name"), &r.name)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(argv: &[&str]) -> pb::Executable {
        pb::Executable {
            cell: "web".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_executable() {
        let mut e = exe(&["/bin/echo", "hi"]);
        e.env.insert("A".into(), "1".into());
        let s = ExecutableSpec::try_from(e).unwrap();
        assert_eq!(s.working_dir, PathBuf::from("/"));
        assert_eq!(s.env, vec![("A".into(), "1".into())]);
        assert!(s.name.is_none());
    }

    #[test]
    fn invalid_executables_name_the_field() {
        let mut cases: Vec<(pb::Executable, &str)> = vec![
            (exe(&[]), "argv"),
            (exe(&["echo"]), "argv[0]"),
            (exe(&["/bin/echo", "a\0b"]), "argv[1]"),
            (
                pb::Executable {
                    cell: "".into(),
                    ..exe(&["/bin/true"])
                },
                "cell",
            ),
            (
                pb::Executable {
                    cell: "a/../b".into(),
                    ..exe(&["/bin/true"])
                },
                "cell",
            ),
            (
                pb::Executable {
                    name: "Bad".into(),
                    ..exe(&["/bin/true"])
                },
                "name",
            ),
            (
                pb::Executable {
                    working_dir: "rel".into(),
                    ..exe(&["/bin/true"])
                },
                "working_dir",
            ),
        ];
        let interactive = |stdin, stdin_once, tty| {
            Some(pb::Interactive {
                stdin,
                stdin_once,
                tty,
            })
        };
        cases.push((
            pb::Executable {
                interactive: interactive(false, true, false),
                ..exe(&["/bin/cat"])
            },
            "interactive.stdin_once",
        ));
        for i in [
            interactive(true, false, false),
            interactive(false, false, true),
        ] {
            cases.push((
                pb::Executable {
                    interactive: i,
                    stdin: b"x".to_vec(),
                    ..exe(&["/bin/cat"])
                },
                "stdin",
            ));
        }
        for (e, field) in cases {
            let err = ExecutableSpec::try_from(e).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut e = exe(&["/bin/true"]);
        e.env.insert("A=B".into(), "1".into());
        assert!(
            ExecutableSpec::try_from(e)
                .unwrap_err()
                .field
                .starts_with("env")
        );
    }
}
