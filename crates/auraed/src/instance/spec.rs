//! Validated Spawn requests.

use std::{path::PathBuf, time::Duration};

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
    /// How long the child may take to become ready.
    pub ready_timeout: Duration,
    /// How long each SVID of the child is valid.
    pub svid_ttl: Duration,
    /// Whether its microVM is restored from a template (see `instance::template`).
    pub template: pb::TemplateUse,
}

/// The shortest SVID lifetime a request may ask for (renewal runs at two thirds).
pub const MIN_SVID_TTL: Duration = Duration::from_secs(120);
/// The longest.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest readiness deadline.
pub const MAX_READY_TIMEOUT: Duration = Duration::from_secs(600);

fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, FieldError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(FieldError::new(field, "must be a positive duration"));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
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
        let ready_timeout =
            match duration(&format!("{field}ready_timeout"), i.ready_timeout.as_ref())? {
                None => super::DEFAULT_READY_TIMEOUT,
                Some(d) if d.is_zero() || d > MAX_READY_TIMEOUT => {
                    return Err(FieldError::new(
                        format!("{field}ready_timeout"),
                        "must be more than 0 and at most 10 min",
                    ));
                }
                Some(d) => d,
            };
        let svid_ttl = match duration(&format!("{field}svid_ttl"), i.svid_ttl.as_ref())? {
            None => super::DEFAULT_SVID_TTL,
            Some(d) if d < MIN_SVID_TTL || d > MAX_SVID_TTL => {
                return Err(FieldError::new(
                    format!("{field}svid_ttl"),
                    "must be from 2 min to 24 h",
                ));
            }
            Some(d) => d,
        };
        let isolation = known_enum(&format!("{field}isolation"), i.isolation, true)?;
        let template = known_enum(&format!("{field}template"), i.template, true)?;
        if template == pb::TemplateUse::TemplateRequired && isolation == pb::Isolation::Cell {
            return Err(FieldError::new(
                format!("{field}template"),
                "TEMPLATE_REQUIRED restores a microVM: a cell-isolated instance has no template",
            ));
        }
        Ok(Self {
            template,
            ready_timeout,
            svid_ttl,
            name: match name {
                Some(n) => n,
                None => Label::parse(&format!("{field}name"), &i.name)?,
            },
            isolation,
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
        assert_eq!(ok.svid_ttl, crate::instance::DEFAULT_SVID_TTL);
        for (ttl, ok) in [(60, false), (120, true), (86_400, true), (86_401, false)] {
            let r = InstanceSpec::parse(
                "",
                pb::Instance {
                    name: "i1".into(),
                    svid_ttl: Some(prost_types::Duration {
                        seconds: ttl,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                None,
            );
            assert_eq!(r.is_ok(), ok, "svid_ttl {ttl}");
            if let Err(e) = r {
                assert_eq!(e.field, "svid_ttl");
            }
        }
        let r = InstanceSpec::parse(
            "",
            pb::Instance {
                name: "i1".into(),
                ready_timeout: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            },
            None,
        );
        assert_eq!(r.unwrap_err().field, "ready_timeout");
    }

    #[test]
    fn a_template_is_known_and_only_for_microvms() {
        let with = |template: i32, isolation: pb::Isolation| {
            InstanceSpec::parse(
                "instance.",
                pb::Instance {
                    name: "i1".into(),
                    template,
                    isolation: isolation as i32,
                    ..Default::default()
                },
                None,
            )
        };
        assert_eq!(
            with(9, pb::Isolation::Auto).unwrap_err().field,
            "instance.template"
        );
        let e = with(
            pb::TemplateUse::TemplateRequired as i32,
            pb::Isolation::Cell,
        )
        .unwrap_err();
        assert_eq!(e.field, "instance.template");
        assert!(e.reason.contains("cell-isolated"), "{e:?}");
        for (t, i) in [
            (pb::TemplateUse::TemplateRequired, pb::Isolation::Auto),
            (pb::TemplateUse::TemplateNever, pb::Isolation::Cell),
            (pb::TemplateUse::TemplateAuto, pb::Isolation::VirtualMachine),
        ] {
            assert_eq!(with(t as i32, i).unwrap().template, t);
        }
    }
}
