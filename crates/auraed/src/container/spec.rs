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
        })
    }
}
