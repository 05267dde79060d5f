//! Validated Spawn requests.

use std::path::PathBuf;

use aurae_proto::runtime::v0 as pb;

use crate::{
    spec::{FieldError, Label, abs_path, known_enum},
    vm::spec::{memory, vcpus},
};

/// Memory of an instance when the request gives none.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub name: Label,
    pub isolation: pb::Isolation,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
}

impl InstanceSpec {
    /// `field` prefixes error fields ("" at the top level, "instance." inside a Pod);
    /// `name` overrides the message's own name (a pod names its instance).
    pub fn parse(field: &str, i: pb::Instance, name: Option<Label>) -> Result<Self, FieldError> {
        let opt_path = |f: &str, s: &str| {
            if s.is_empty() {
                Ok(None)
            } else {
                abs_path(&format!("{field}{f}"), s).map(Some)
            }
        };
        Ok(Self {
            name: match name {
                Some(n) => n,
                None => Label::parse(&format!("{field}name"), &i.name)?,
            },
            isolation: known_enum(&format!("{field}isolation"), i.isolation, true)?,
            vcpus: vcpus(&format!("{field}vcpus"), i.vcpus.max(1))?,
            memory_bytes: memory(
                &format!("{field}memory_bytes"),
                if i.memory_bytes == 0 {
                    DEFAULT_MEMORY
                } else {
                    i.memory_bytes
                },
            )?,
            kernel: opt_path("kernel_path", &i.kernel_path)?,
            initramfs: opt_path("initramfs_path", &i.initramfs_path)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_isolation_is_refused() {
        let i = pb::Instance {
            name: "i1".into(),
            isolation: 7,
            ..Default::default()
        };
        assert_eq!(
            InstanceSpec::parse("", i, None).unwrap_err().field,
            "isolation"
        );
        let ok = InstanceSpec::parse(
            "",
            pb::Instance {
                name: "i1".into(),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(ok.memory_bytes, DEFAULT_MEMORY);
        assert_eq!(ok.vcpus, 1);
    }
}
