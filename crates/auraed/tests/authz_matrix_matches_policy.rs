//! Authorization matrix: identities × every RPC auraed serves × a name inside / outside
//! the identity's grant. The expected allow/deny of every cell is computed here from the
//! policy table below, independently of auraed's own policy code, and must match exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{collections::BTreeSet, path::Path};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions, TRUST_DOMAIN};
use bytes::{Buf, BufMut};
use prost::Message;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// Passes encoded messages through, so one client can call every method.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// The policy under test, as data: (identity, method patterns, name patterns).
const GRANTS: &[(&str, &[&str], &[&str])] = &[
    ("admin", &["*"], &["*"]),
    (
        "alice",
        &[
            "aurae.runtime.v0.Runtime/RunExecutable",
            "aurae.runtime.v0.Runtime/RunCell",
            "aurae.runtime.v0.Cells/*",
            "aurae.runtime.v0.Executables/*",
            "aurae.runtime.v0.Daemon/Info",
            "grpc.health.v1.Health/Check",
        ],
        &["team-a"],
    ),
    (
        "bob",
        &[
            "aurae.runtime.v0.Runtime/RunVirtualMachine",
            "aurae.runtime.v0.VirtualMachines/*",
            "aurae.runtime.v0.Pods/Get",
            "aurae.runtime.v0.Events/*",
            "grpc.reflection.v1.ServerReflection/*",
        ],
        &["team-b-*"],
    ),
];
/// Has a certificate from the right CA, but no grant.
const NOBODY: &str = "eve";

/// What each identity may run as and pull from (the matrix's requests use uid 1000 and
/// an image on a closed loopback port).
fn extras(who: &str) -> &'static str {
    match who {
        "admin" => {
            "allow_uid_zero = true\nuids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\nregistries = [\"*\"]\nvolumes = [\"*\"]\n"
        }
        "alice" => "uids = [\"1000\"]\ngids = [\"1000\"]\nregistries = [\"127.0.0.1:1\"]\n",
        _ => "",
    }
}

fn policy_toml() -> String {
    GRANTS
        .iter()
        .map(|(who, methods, names)| {
            format!(
                "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/{who}\"\nmethods = {methods:?}\nnames = {names:?}\n{}\n",
                extras(who)
            )
        })
        .collect()
}

fn method_granted(who: &str, method: &str) -> bool {
    GRANTS.iter().filter(|g| g.0 == who).any(|(_, methods, _)| {
        methods.iter().any(|p| {
            *p == "*"
                || *p == method
                || p.strip_suffix("/*")
                    .is_some_and(|svc| method.starts_with(&format!("{svc}/")))
        })
    })
}

fn name_granted(who: &str, name: &str) -> bool {
    GRANTS.iter().filter(|g| g.0 == who).any(|(_, _, names)| {
        names.iter().any(|p| {
            *p == "*"
                || p.strip_suffix('*').is_some_and(|pre| name.starts_with(pre))
                || (!p.ends_with('*') && (name == *p || name.starts_with(&format!("{p}/"))))
        })
    })
}

/// An encoded request for `input` (a message type name) touching `name`; `None` if the
/// request names no resource.
fn request(input: &str, name: &str) -> (Vec<u8>, bool) {
    let exe = || pb::ExecutableRef {
        cell: name.into(),
        name: "x".into(),
    };
    // A registry on a closed loopback port: an allowed pull fails fast (UNAVAILABLE).
    let container = || {
        Some(pb::Container {
            image: "127.0.0.1:1/busybox".into(),
            ..Default::default()
        })
    };
    match input {
        ".aurae.runtime.v0.Executable" => (
            pb::Executable {
                cell: name.into(),
                argv: vec!["/bin/true".into()],
                uid: Some(1000),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.Cell" => (
            pb::Cell {
                name: name.into(),
                container: container(),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.VirtualMachine" => (
            pb::VirtualMachine {
                name: name.into(),
                kernel_path: "/boot/vmlinuz".into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.Instance" => (
            pb::Instance {
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.Pod" => (
            pb::Pod {
                name: name.into(),
                container: container(),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.ExecutableRef" => (exe().encode_to_vec(), true),
        ".aurae.runtime.v0.StopExecutableRequest" => (
            pb::StopExecutableRequest {
                executable: Some(exe()),
                grace_period: None,
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.WaitExecutableRequest" => (
            pb::WaitExecutableRequest {
                executable: Some(exe()),
                timeout: None,
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.SignalExecutableRequest" => (
            pb::SignalExecutableRequest {
                executable: Some(exe()),
                signal: 15,
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.ExecutableLogsRequest" => (
            pb::ExecutableLogsRequest {
                executable: Some(exe()),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.NameRef" => (pb::NameRef { name: name.into() }.encode_to_vec(), true),
        ".aurae.runtime.v0.StopRequest" => (
            pb::StopRequest {
                name: name.into(),
                grace_period: None,
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.WaitRequest" => (
            pb::WaitRequest {
                name: name.into(),
                timeout: None,
            }
            .encode_to_vec(),
            true,
        ),
        ".aurae.runtime.v0.LogsRequest" => (
            pb::LogsRequest {
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            true,
        ),
        ".grpc.reflection.v1.ServerReflectionRequest"
        | ".grpc.reflection.v1alpha.ServerReflectionRequest" => {
            // field 7: list_services = "*"
            (vec![0x3a, 0x01, b'*'], false)
        }
        // List requests, Info, Shutdown, health, events: no resource name.
        _ => (Vec::new(), false),
    }
}

struct Method {
    path: String,
    input: String,
    client_streaming: bool,
    server_streaming: bool,
}

fn methods() -> Vec<Method> {
    let mut out = Vec::new();
    for fds in [
        aurae_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(fds).unwrap();
        for f in set.file {
            for s in &f.service {
                for m in &s.method {
                    out.push(Method {
                        path: format!("{}.{}/{}", f.package(), s.name(), m.name()),
                        input: m.input_type().to_owned(),
                        client_streaming: m.client_streaming(),
                        server_streaming: m.server_streaming(),
                    });
                }
            }
        }
    }
    out
}

async fn call(channel: tonic::transport::Channel, m: &Method, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = format!("/{}", m.path).parse().unwrap();
    match (m.client_streaming, m.server_streaming) {
        (false, false) => grpc.unary(Request::new(body), path, Raw).await.map(|_| ()),
        (false, true) => {
            let mut s = grpc
                .server_streaming(Request::new(body), path, Raw)
                .await?
                .into_inner();
            // One message (or the stream's error) is enough to know the call was served.
            tokio::time::timeout(std::time::Duration::from_millis(500), s.message())
                .await
                .map_or(Ok(()), |r| r.map(|_| ()))
        }
        (true, _) => {
            let req = Request::new(tokio_stream::iter(vec![body]));
            let mut s = grpc.streaming(req, path, Raw).await?.into_inner();
            s.message().await.map(|_| ())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_matches_the_policy_exactly() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy_toml()),
            // Allowed Spawn calls really spawn: their bridge and veths stay out of the
            // host's network namespace (as root; without root they cannot spawn).
            own_netns: nix::unistd::geteuid().is_root(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let methods = methods();
    let served: BTreeSet<&str> = methods.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(served.len(), methods.len());
    // (identity, a name inside its grant, a name outside it)
    let who: [(&str, &str, &str); 4] = [
        ("admin", "team-a", "team-b-x"),
        ("alice", "team-a", "team-b-x"),
        ("bob", "team-b-x", "team-a"),
        (NOBODY, "team-a", "team-b-x"),
    ];
    let mut cells = 0;
    let mut mismatches = Vec::new();
    // Methods that answer UNIMPLEMENTED to a caller allowed to call them.
    let mut unimplemented = BTreeSet::new();
    let (mut allowed, mut denied) = (0, 0);
    for (id, own, other) in who {
        let channel = d.client(id).await.unwrap().channel();
        for m in &methods {
            for (scope, name) in [("own", own), ("other", other)] {
                let (body, named) = request(&m.input, name);
                // Images/Load answers only the daemon's own parent (none here), whatever
                // a grant says: denied for everyone.
                let expect_allow = method_granted(id, &m.path)
                    && (!named || name_granted(id, name))
                    && !m.path.ends_with("Images/Load");
                if m.path.ends_with("Daemon/Shutdown") && expect_allow {
                    continue; // would stop the daemon; covered by its own test
                }
                cells += 1;
                let got = call(channel.clone(), m, body).await;
                let got_denied = matches!(&got, Err(s) if s.code() == Code::PermissionDenied);
                if matches!(&got, Err(s) if s.code() == Code::Unimplemented) {
                    unimplemented.insert(m.path.clone());
                }
                if let Err(s) = &got {
                    assert!(
                        !matches!(
                            s.code(),
                            Code::Internal | Code::Unauthenticated | Code::Unknown
                        ),
                        "{id} {} {scope}: unexpected {s:?}",
                        m.path
                    );
                }
                if got_denied == expect_allow {
                    mismatches.push(format!(
                        "{id} {} {scope} ({name}): expected {}, got {got:?}",
                        m.path,
                        if expect_allow { "allow" } else { "deny" }
                    ));
                }
                if expect_allow {
                    allowed += 1
                } else {
                    denied += 1
                }
            }
        }
    }
    println!(
        "authz matrix: {cells} cells ({} identities x {} methods x own/other, {allowed} allow, {denied} deny), {} mismatches",
        who.len(),
        methods.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(
        allowed > 50 && denied > 100,
        "matrix too one-sided: {allowed} allow, {denied} deny"
    );
    docs_claim_unimplemented_exactly(&methods, &unimplemented);
}

/// The docs' `UNIMPLEMENTED` claims match what the daemon answers: every method a
/// paragraph, list item or table row of README, ARCHITECTURE, SPECIFICATION or docs/ names
/// next to the word answers it, and every method that answers it is named so somewhere.
fn docs_claim_unimplemented_exactly(methods: &[Method], unimplemented: &BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![
        root.join("README.md"),
        root.join("ARCHITECTURE.md"),
        root.join("SPECIFICATION.md"),
    ];
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            files.push(e.path());
        }
    }
    // How a paragraph may name a method: `Service/Method`, or the method's bare name when
    // no other service has a method of that name.
    let mut names: Vec<(String, String)> = Vec::new();
    for m in methods {
        let (svc, method) = m.path.rsplit_once('/').unwrap();
        let svc = svc.rsplit('.').next().unwrap();
        names.push((format!("{svc}/{method}"), m.path.clone()));
        if methods
            .iter()
            .filter(|o| o.path.ends_with(&format!("/{method}")))
            .count()
            == 1
        {
            names.push((method.to_owned(), m.path.clone()));
        }
    }
    let word_at = |text: &str, i: usize, len: usize| {
        let before = text[..i].chars().next_back();
        let after = text[i + len..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
    };
    let mut claimed = BTreeSet::new();
    let mut paragraphs = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // A claim is a paragraph, a list item or a table row (a table or a list is one
        // paragraph, but its rows and items say separate things).
        let mut units = Vec::new();
        for para in text.split("\n\n") {
            let mut unit = String::new();
            for line in para.lines() {
                let t = line.trim_start();
                if (t.starts_with("- ") || t.starts_with("* ") || t.starts_with('|'))
                    && !unit.is_empty()
                {
                    units.push(std::mem::take(&mut unit));
                }
                unit.push_str(line);
                unit.push('\n');
            }
            units.push(unit);
        }
        for para in units.iter().filter(|p| p.contains("UNIMPLEMENTED")) {
            paragraphs += 1;
            for (name, path) in &names {
                if para
                    .match_indices(name.as_str())
                    .any(|(i, _)| word_at(para, i, name.len()))
                {
                    claimed.insert(path.clone());
                }
            }
        }
    }
    println!(
        "docs: {paragraphs} paragraphs, items or rows mention UNIMPLEMENTED, naming {} methods; the daemon answers it for {}",
        claimed.len(),
        unimplemented.len()
    );
    let false_claims: Vec<_> = claimed.difference(unimplemented).collect();
    let unclaimed: Vec<_> = unimplemented.difference(&claimed).collect();
    assert!(
        false_claims.is_empty(),
        "the docs say these answer UNIMPLEMENTED, but they are built: {false_claims:?}"
    );
    assert!(
        unclaimed.is_empty(),
        "these answer UNIMPLEMENTED but no doc says so: {unclaimed:?}"
    );
}

/// The privilege half of the matrix: identities × uid/gid/registry/quota choices. The
/// expected decision is computed here from the table, independently of auraed's code;
/// requests name a cell that does not exist, so an allowed one ends in NOT_FOUND (ids,
/// quotas) or UNAVAILABLE (a pull from a closed port), a denied one in
/// PERMISSION_DENIED, RESOURCE_EXHAUSTED or INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privilege_matrix_matches_the_policy_exactly() {
    struct Who {
        name: &'static str,
        uid_zero: bool,
        ids: &'static [(u32, u32)],
        registries: &'static [&'static str],
        exe_quota: Option<u32>,
    }
    const WHO: &[Who] = &[
        Who {
            name: "admin",
            uid_zero: true,
            ids: &[(1, 2147483647)],
            registries: &["*"],
            exe_quota: None,
        },
        Who {
            name: "alice",
            uid_zero: false,
            ids: &[(1000, 1999)],
            registries: &["127.0.0.1:1/team-a"],
            exe_quota: None,
        },
        Who {
            name: "carol",
            uid_zero: true,
            ids: &[(5, 5), (70000, 70010)],
            registries: &[],
            exe_quota: Some(0),
        },
        Who {
            name: "dave",
            uid_zero: false,
            ids: &[],
            registries: &["127.0.0.1:1"],
            exe_quota: None,
        },
    ];
    let mut policy = String::new();
    for w in WHO {
        let ids: Vec<String> = w.ids.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        policy += &format!(
            "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/{}\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\nallow_uid_zero = {}\nuids = {ids:?}\ngids = {ids:?}\nregistries = {:?}\n",
            w.name, w.uid_zero, w.registries
        );
        if let Some(q) = w.exe_quota {
            policy += &format!("[grant.quota]\nexecutables = {q}\n");
        }
        policy += "\n";
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let id_ok = |w: &Who, id: u32| {
        if id > i32::MAX as u32 {
            None // not an id at all: INVALID_ARGUMENT for everyone
        } else if id == 0 {
            Some(w.uid_zero)
        } else {
            Some(w.ids.iter().any(|&(a, b)| a <= id && id <= b))
        }
    };
    let ids: [(Option<u32>, Option<u32>); 12] = [
        (None, None),
        (Some(0), None),
        (Some(1000), None),
        (Some(1000), Some(0)),
        (Some(1000), Some(42)),
        (Some(1500), Some(1999)),
        (Some(2000), Some(1000)),
        (Some(5), Some(5)),
        (Some(70005), None),
        (Some(u32::MAX), None),
        (Some(1000), Some(u32::MAX)),
        (Some(1 << 31), Some(1000)),
    ];
    let mut mismatches = Vec::new();
    let mut cases = 0;
    for w in WHO {
        let c = d.client(w.name).await.unwrap();
        for (uid, gid) in ids {
            let u = uid.unwrap_or(0);
            let g = gid.unwrap_or(u);
            let expect = match (id_ok(w, u), id_ok(w, g)) {
                (None, _) | (_, None) => Code::InvalidArgument,
                (Some(true), Some(true)) => Code::NotFound,
                _ => Code::PermissionDenied,
            };
            let got = c
                .runtime()
                .run_executable(pb::Executable {
                    cell: "team-a/none".into(),
                    argv: vec!["/bin/true".into()],
                    uid,
                    gid,
                    ..Default::default()
                })
                .await;
            let code = got.as_ref().err().map_or(Code::Ok, |s| s.code());
            cases += 1;
            if code != expect {
                mismatches.push(format!(
                    "{} uid {uid:?} gid {gid:?}: expected {expect:?}, got {got:?}",
                    w.name
                ));
            }
        }
        for image in [
            "127.0.0.1:1/team-a/app",
            "127.0.0.1:1/team-b/app",
            "127.0.0.1:1/team-ab/app",
            "127.0.0.2:1/team-a/app",
            "127.0.0.3:1/library/busybox",
        ] {
            let (host, repo) = image.split_once('/').unwrap();
            let allowed = w.registries.iter().any(|r| {
                *r == "*"
                    || *r == host
                    || r.split_once('/').is_some_and(|(h, p)| {
                        h == host && (repo == p || repo.starts_with(&format!("{p}/")))
                    })
            });
            let expect = if allowed {
                Code::Unavailable
            } else {
                Code::PermissionDenied
            };
            let got = c
                .runtime()
                .run_cell(pb::Cell {
                    name: "team-a/pulled".into(),
                    container: Some(pb::Container {
                        image: image.into(),
                        uid: Some(1000).filter(|_| !w.ids.is_empty()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await;
            let code = got.as_ref().err().map_or(Code::Ok, |s| s.code());
            cases += 1;
            if code != expect {
                mismatches.push(format!(
                    "{} image {image}: expected {expect:?}, got {got:?}",
                    w.name
                ));
            }
        }
    }
    println!(
        "privilege matrix: {cases} cases ({} identities x (12 uid/gid pairs + 5 images)), {} mismatches",
        WHO.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
