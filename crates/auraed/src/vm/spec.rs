//! Validated virtual machine requests. Sizes are u64 bytes with checked arithmetic.

use std::path::PathBuf;

use aurae_proto::runtime::v0 as pb;

use crate::spec::{FieldError, Label, abs_path};

pub const MIN_MEMORY: u64 = 32 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;
pub const MEMORY_ALIGN: u64 = 2 << 20;
pub const MAX_VCPUS: u32 = 32;
pub const MAX_CMDLINE: usize = 2048;

/// Guest memory in bytes: at least 32 MiB, at most 1 TiB, a multiple of 2 MiB.
pub fn memory(field: &str, bytes: u64) -> Result<u64, FieldError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || !bytes.is_multiple_of(MEMORY_ALIGN) {
        return Err(FieldError::new(
            field,
            format!("{bytes} bytes: must be a multiple of 2 MiB between 32 MiB and 1 TiB"),
        ));
    }
    Ok(bytes)
}

pub fn vcpus(field: &str, n: u32) -> Result<u32, FieldError> {
    if !(1..=MAX_VCPUS).contains(&n) {
        return Err(FieldError::new(
            field,
            format!("{n} is outside 1..={MAX_VCPUS}"),
        ));
    }
    Ok(n)
}

fn mac(field: &str, s: &str) -> Result<Option<[u8; 6]>, FieldError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || {
        FieldError::new(
            field,
            format!("{s:?} is not a MAC address like 52:54:00:12:34:56"),
        )
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if out[0] & 1 == 1 {
        return Err(FieldError::new(
            field,
            format!("{s:?} is a multicast address"),
        ));
    }
    Ok(Some(out))
}

/// Most drives a VM may have (each is a virtio-mmio device of the VMM, as are its network
/// interface and its virtio console).
pub const MAX_DRIVES: usize = aurae_vmm::layout::MAX_MMIO_DEVICES - 2;

/// A block device of a VM: read-only unless asked (and granted) otherwise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Drive {
    /// The host path as sent (absolute, no `..`); resolved below a VM image root when the
    /// VM starts.
    pub path: PathBuf,
    /// `Drive.writable` was set: the guest may write to it (needs the grant's
    /// `allow_writable_drives` and its `volumes` to cover the path).
    pub writable: bool,
}

/// `Drive.read_only` is the old way to ask for what is now the default, and stays accepted;
/// asking for both is a contradiction.
fn drive(i: usize, d: &pb::Drive) -> Result<Drive, FieldError> {
    let field = format!("drives[{i}]");
    if d.writable && d.read_only {
        return Err(FieldError::new(
            field,
            "read_only and writable are both set: drives are read-only unless writable is set",
        ));
    }
    Ok(Drive {
        path: abs_path(&format!("{field}.path"), &d.path)?,
        writable: d.writable,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    pub name: Label,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub drives: Vec<Drive>,
    pub macs: Vec<Option<[u8; 6]>>,
    /// Recorded by name; a record from before templates existed reads as the default.
    #[serde(default, with = "template_by_name")]
    pub cpu_template: aurae_vmm::CpuTemplate,
    /// Restored from this stored snapshot instead of booted: `kernel` is then empty and
    /// `vcpus`, `memory_bytes` and `cpu_template` are the snapshot's
    /// ([`VmSpec::restoring`]).
    #[serde(default)]
    pub snapshot: Option<Label>,
}

impl VmSpec {
    /// A restore's spec with the snapshot's size and template filled in, once its info is
    /// read; INVALID_ARGUMENT naming `drives` or `interfaces` when the request does not
    /// give as many as the snapshot's VM had.
    pub fn restoring(mut self, info: &super::snapshots::SnapshotInfo) -> Result<Self, FieldError> {
        for (field, given, had) in [
            ("drives", self.drives.len(), info.drives),
            ("interfaces", self.macs.len(), info.interfaces),
        ] {
            if given != had {
                return Err(FieldError::new(
                    field,
                    format!(
                        "{given} given: snapshot {:?} was taken of a VM with {had}",
                        info.name
                    ),
                ));
            }
        }
        self.vcpus = vcpus("vcpus", info.vcpus)?;
        self.memory_bytes = memory("memory_bytes", info.memory_bytes)?;
        self.cpu_template = cpu_template("cpu_template", &info.cpu_template)?;
        Ok(self)
    }
}

/// A [`aurae_vmm::CpuTemplate`] in a record: its name.
mod template_by_name {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &aurae_vmm::CpuTemplate, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<aurae_vmm::CpuTemplate, D::Error> {
        let name = String::deserialize(d)?;
        aurae_vmm::CpuTemplate::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown CPU template {name:?}")))
    }
}

fn drives(v: &pb::VirtualMachine) -> Result<Vec<Drive>, FieldError> {
    v.drives
        .iter()
        .enumerate()
        .map(|(i, d)| drive(i, d))
        .collect()
}

fn macs(v: &pb::VirtualMachine) -> Result<Vec<Option<[u8; 6]>>, FieldError> {
    v.interfaces
        .iter()
        .enumerate()
        .map(|(i, n)| mac(&format!("interfaces[{i}].mac"), &n.mac))
        .collect()
}

impl TryFrom<pb::VirtualMachine> for VmSpec {
    type Error = FieldError;

    fn try_from(v: pb::VirtualMachine) -> Result<Self, FieldError> {
        if v.drives.len() > MAX_DRIVES {
            return Err(FieldError::new(
                "drives",
                format!("{} drives: at most {MAX_DRIVES}", v.drives.len()),
            ));
        }
        if v.cmdline.len() > MAX_CMDLINE || v.cmdline.contains('\0') {
            return Err(FieldError::new(
                "cmdline",
                format!("longer than {MAX_CMDLINE} bytes or contains NUL"),
            ));
        }
        if !v.snapshot.is_empty() {
            let snapshot = Label::parse("snapshot", &v.snapshot)?;
            for (field, set) in [
                ("kernel_path", !v.kernel_path.is_empty()),
                ("initramfs_path", !v.initramfs_path.is_empty()),
                ("cmdline", !v.cmdline.is_empty()),
                ("vcpus", v.vcpus != 0),
                ("memory_bytes", v.memory_bytes != 0),
                ("cpu_template", !v.cpu_template.is_empty()),
            ] {
                if set {
                    return Err(FieldError::new(
                        field,
                        "must be unset when restoring a snapshot: the snapshot's is used",
                    ));
                }
            }
            return Ok(Self {
                name: Label::parse("name", &v.name)?,
                kernel: PathBuf::new(),
                initramfs: None,
                cmdline: String::new(),
                // Placeholders until the snapshot's info is read (VmSpec::restoring).
                vcpus: 1,
                memory_bytes: MIN_MEMORY,
                drives: drives(&v)?,
                macs: macs(&v)?,
                cpu_template: aurae_vmm::CpuTemplate::default(),
                snapshot: Some(snapshot),
            });
        }
        Ok(Self {
            name: Label::parse("name", &v.name)?,
            kernel: abs_path("kernel_path", &v.kernel_path)?,
            initramfs: if v.initramfs_path.is_empty() {
                None
            } else {
                Some(abs_path("initramfs_path", &v.initramfs_path)?)
            },
            cmdline: v.cmdline.clone(),
            vcpus: vcpus("vcpus", v.vcpus)?,
            memory_bytes: memory("memory_bytes", v.memory_bytes)?,
            drives: drives(&v)?,
            macs: macs(&v)?,
            cpu_template: cpu_template("cpu_template", &v.cpu_template)?,
            snapshot: None,
        })
    }
}

/// A CPU template by name; empty is the default (normalized).
fn cpu_template(field: &str, name: &str) -> Result<aurae_vmm::CpuTemplate, FieldError> {
    if name.is_empty() {
        return Ok(aurae_vmm::CpuTemplate::default());
    }
    aurae_vmm::CpuTemplate::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = aurae_vmm::CpuTemplate::ALL
            .iter()
            .map(|t| t.name())
            .collect();
        FieldError::new(
            field,
            format!(
                "unknown CPU template {:?}: one of {}",
                name.chars().take(64).collect::<String>(),
                known.join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> pb::VirtualMachine {
        pb::VirtualMachine {
            name: "vm1".into(),
            kernel_path: "/k/vmlinuz".into(),
            vcpus: 1,
            memory_bytes: 5 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_template_is_named_or_refused() {
        assert_eq!(
            VmSpec::try_from(vm()).unwrap().cpu_template,
            aurae_vmm::CpuTemplate::Normalized
        );
        let named = |t: &str| {
            VmSpec::try_from(pb::VirtualMachine {
                cpu_template: t.into(),
                ..vm()
            })
        };
        assert_eq!(
            named("host").unwrap().cpu_template,
            aurae_vmm::CpuTemplate::Host
        );
        let e = named("T2").unwrap_err();
        assert_eq!(e.field, "cpu_template");
        assert!(e.to_string().contains("normalized, host"), "{e}");
    }

    #[test]
    fn memory_above_4_gib_does_not_wrap() {
        assert_eq!(VmSpec::try_from(vm()).unwrap().memory_bytes, 5 << 30);
    }

    #[test]
    fn drives_are_read_only_unless_writable_is_set() {
        let d = |read_only, writable| pb::VirtualMachine {
            drives: vec![pb::Drive {
                path: "/k/disk".into(),
                read_only,
                writable,
            }],
            ..vm()
        };
        let w = |v| VmSpec::try_from(v).map(|s| s.drives[0].writable);
        assert!(!w(d(false, false)).unwrap(), "the default");
        assert!(!w(d(true, false)).unwrap(), "read_only still accepted");
        assert!(w(d(false, true)).unwrap());
        assert_eq!(w(d(true, true)).unwrap_err().field, "drives[0]");
        let many = pb::VirtualMachine {
            drives: vec![
                pb::Drive {
                    path: "/k/disk".into(),
                    ..Default::default()
                };
                MAX_DRIVES + 1
            ],
            ..vm()
        };
        assert_eq!(VmSpec::try_from(many).unwrap_err().field, "drives");
    }

    #[test]
    fn bad_vms_name_the_field() {
        let cases: Vec<(pb::VirtualMachine, &str)> = vec![
            (pb::VirtualMachine { vcpus: 0, ..vm() }, "vcpus"),
            (pb::VirtualMachine { vcpus: 33, ..vm() }, "vcpus"),
            (
                pb::VirtualMachine {
                    memory_bytes: 1 << 20,
                    ..vm()
                },
                "memory_bytes",
            ),
            (
                pb::VirtualMachine {
                    memory_bytes: (64 << 20) + 1,
                    ..vm()
                },
                "memory_bytes",
            ),
            (
                pb::VirtualMachine {
                    kernel_path: "vmlinuz".into(),
                    ..vm()
                },
                "kernel_path",
            ),
            (
                pb::VirtualMachine {
                    name: "".into(),
                    ..vm()
                },
                "name",
            ),
            (
                pb::VirtualMachine {
                    interfaces: vec![pb::NetworkInterface {
                        mac: "01:00:00:00:00:00".into(),
                    }],
                    ..vm()
                },
                "interfaces[0].mac",
            ),
        ];
        for (v, field) in cases {
            assert_eq!(VmSpec::try_from(v).unwrap_err().field, field);
        }
    }
}
