//! Cgroup ids resolve to the right workload on real cgroups: the test makes v2 cgroups named as
//! systemd, docker, podman and the kubelet (both drivers) would name them, moves a process into
//! each, and checks that the id of each (`stat -c %i`, which the kernel's own file handle for
//! the cgroup confirms is its kernfs id) resolves through the agent's resolver to the cgroup the
//! kernel lists for the process (`/proc/<pid>/cgroup`) and to the right workload; and that a
//! removed cgroup keeps its last name. Uses the library only: no kernel programs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]
mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cgroups::{TestCgroups, cgroup2_mounts};
use common::*;
use tracer::host::cgroups::{CgroupResolver, ResolverConfig, find_cgroup2_mount};
use tracer_core::workload::{Qos, Runtime, Workload, WorkloadKind};

const ID1: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const ID2: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const ID3: &str = "5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555aaaa";
const ID4: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const ID5: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
const ID6: &str = "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef";
const POD1: &str = "2f6e8a1c-3b4d-4e5f-9a8b-7c6d5e4f3a2b";
const POD2: &str = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a";
const POD3: &str = "0a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9";

#[allow(clippy::too_many_arguments, reason = "a table row")]
fn workload(
    kind: WorkloadKind,
    name: &str,
    unit: Option<&str>,
    uid: Option<u32>,
    container: Option<(Option<Runtime>, &str)>,
    pod: Option<(&str, Qos)>,
) -> Workload {
    Workload {
        kind,
        name: name.to_owned(),
        unit: unit.map(str::to_owned),
        uid,
        container_id: container.map(|(_, id)| id.to_owned()),
        runtime: container.and_then(|(runtime, _)| runtime),
        pod_uid: pod.map(|(uid, _)| uid.to_owned()),
        qos: pod.map(|(_, qos)| qos),
    }
}

/// Cgroups named as their managers name them (below the test's own parent), and the workload
/// each must resolve to.
fn cases() -> Vec<(String, Workload)> {
    use Qos::*;
    use Runtime::*;
    use WorkloadKind::*;
    let nginx = "tracer-test-nginx.service";
    vec![
        (
            format!("system.slice/{nginx}"),
            workload(Service, nginx, Some(nginx), None, None, None),
        ),
        (
            "system.slice/system-tracer\\x2dtest.slice/tracer-test@tty1.service".into(),
            workload(
                Service,
                "tracer-test@tty1.service",
                Some("tracer-test@tty1.service"),
                None,
                None,
                None,
            ),
        ),
        (
            "user.slice/user-1000.slice/user@1000.service/app.slice/tracer-test-app.service".into(),
            workload(
                Service,
                "user-1000/tracer-test-app.service",
                Some("tracer-test-app.service"),
                Some(1000),
                None,
                None,
            ),
        ),
        (
            "user.slice/user-1000.slice/session-3.scope".into(),
            workload(
                Session,
                "user-1000/session-3.scope",
                Some("session-3.scope"),
                Some(1000),
                None,
                None,
            ),
        ),
        (
            format!("docker/{ID1}"),
            workload(
                Container,
                &format!("docker/{}", &ID1[..12]),
                None,
                None,
                Some((Some(Docker), ID1)),
                None,
            ),
        ),
        (
            format!("system.slice/docker-{ID2}.scope"),
            workload(
                Container,
                &format!("docker/{}", &ID2[..12]),
                None,
                None,
                Some((Some(Docker), ID2)),
                None,
            ),
        ),
        (
            format!("machine.slice/libpod-{ID3}.scope"),
            workload(
                Container,
                &format!("podman/{}", &ID3[..12]),
                None,
                None,
                Some((Some(Podman), ID3)),
                None,
            ),
        ),
        (
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID4}.scope",
                POD1.replace('-', "_")
            ),
            workload(
                Pod,
                &format!("pod/{POD1}"),
                None,
                None,
                Some((Some(Containerd), ID4)),
                Some((POD1, Burstable)),
            ),
        ),
        (
            format!(
                "kubepods.slice/kubepods-pod{}.slice/crio-{ID5}.scope",
                POD2.replace('-', "_")
            ),
            workload(
                Pod,
                &format!("pod/{POD2}"),
                None,
                None,
                Some((Some(CriO), ID5)),
                Some((POD2, Guaranteed)),
            ),
        ),
        (
            format!("kubepods/besteffort/pod{POD3}/{ID6}"),
            workload(
                Pod,
                &format!("pod/{POD3}"),
                None,
                None,
                Some((None, ID6)),
                Some((POD3, BestEffort)),
            ),
        ),
    ]
}

/// The cgroup's id from `stat -c %i`, the tool an operator would use.
fn stat_inode(dir: &Path) -> u64 {
    run_ok("stat", &["-c", "%i", dir.to_str().expect("utf-8 path")])
        .trim()
        .parse()
        .expect("stat printed a number")
}

/// The cgroup's id as the kernel encodes it in a file handle (kernfs: 8 bytes, the node id):
/// the same number `sk->sk_cgrp_data.cgroup->kn->id` holds.
fn kernfs_id(dir: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        bytes: libc::c_uint,
        kind: libc::c_int,
        f_handle: [u8; 64],
    }
    let path = CString::new(dir.as_os_str().as_bytes()).expect("no NUL in path");
    let mut handle = Handle {
        bytes: 64,
        kind: 0,
        f_handle: [0; 64],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `path` is NUL-terminated; `handle` starts like `struct file_handle` and has room
    // for the 64 bytes its `handle_bytes` announces; `mount_id` is a valid out-pointer.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&raw mut handle).cast::<libc::file_handle>(),
            &raw mut mount_id,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "name_to_handle_at {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    assert_eq!(handle.bytes, 8, "a kernfs file handle holds one u64");
    let mut id = [0_u8; 8];
    id.copy_from_slice(&handle.f_handle[..8]);
    u64::from_ne_bytes(id)
}

/// The process's cgroup v2 path as the kernel lists it (`0::<path>`).
fn proc_cgroup(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned()
}

#[test]
fn the_agents_mount_is_the_cgroup2_mount_of_mountinfo() {
    require_root();
    let mounts = cgroup2_mounts();
    let found = find_cgroup2_mount().expect("cgroup2 mount");
    assert!(
        mounts
            .iter()
            .any(|(point, root)| *point == found.mount_point && *root == found.root),
        "{found:?} not among {mounts:?}"
    );
    let (point, _) = mounts
        .iter()
        .find(|(_, root)| root == "/")
        .expect("a whole hierarchy");
    assert_eq!(found.mount_point, *point);
}

#[test]
fn cgroups_named_by_systemd_docker_podman_and_the_kubelet_resolve_to_their_workload() {
    require_tool("stat");
    let mut tree = TestCgroups::create();
    // Built before the cgroups exist: every id below is new to it, found by a rescan.
    let mut resolver = CgroupResolver::new(ResolverConfig {
        rescan_interval: Duration::ZERO,
        ..ResolverConfig::default()
    })
    .expect("resolver");
    let cases = cases();
    let mut ids = Vec::new();
    for (rel, expected) in &cases {
        let pid = tree.spawn_in(rel);
        let dir = tree.dir.join(rel);
        let id = stat_inode(&dir);
        assert_eq!(kernfs_id(&dir), id, "{rel}: the cgroup id is its inode");
        let kernel_path = proc_cgroup(pid);
        assert_eq!(kernel_path, tree.path_of(rel));
        assert!(
            resolver.cached(id).is_none(),
            "{rel}: known before any rescan"
        );
        let resolved = resolver
            .resolve(id)
            .unwrap_or_else(|| panic!("{rel}: id {id} unresolved"));
        assert_eq!(resolved.cgroup.id, id);
        assert_eq!(resolved.cgroup.path, kernel_path, "{rel}");
        assert_eq!(resolved.cgroup.workload, *expected, "{rel}");
        assert!(!resolved.removed);
        ids.push(id);
    }
    // A resolver built now finds them all in its first walk, with no rescan.
    let mut fresh = CgroupResolver::new(ResolverConfig {
        rescan_interval: Duration::from_secs(3600),
        ..ResolverConfig::default()
    })
    .expect("resolver");
    for ((rel, expected), id) in cases.iter().zip(&ids) {
        let resolved = fresh
            .cached(*id)
            .unwrap_or_else(|| panic!("{rel}: not prefilled"));
        assert_eq!(resolved.cgroup.workload, *expected, "{rel}");
    }
    // Walks bounded in depth cannot reach the pods (5 levels below the hierarchy's root): the
    // walk says it is incomplete, and the id is not declared gone.
    let mut shallow = CgroupResolver::new(ResolverConfig {
        rescan_interval: Duration::ZERO,
        max_depth: 3,
        ..ResolverConfig::default()
    })
    .expect("resolver");
    let (pod_rel, _) = &cases[7];
    let pod_id = stat_inode(&tree.dir.join(pod_rel));
    assert_eq!(shallow.resolve(pod_id), None);
    assert!(shallow.walk(Instant::now()).expect("walk").truncated);
    assert_eq!(shallow.resolve(pod_id), None);
    let (service_rel, service) = &cases[0];
    let service_id = stat_inode(&tree.dir.join(service_rel));
    assert_eq!(
        shallow
            .resolve(service_id)
            .expect("3 levels deep")
            .cgroup
            .workload,
        *service
    );
    let walks = shallow.walks();
    assert_eq!(shallow.resolve(pod_id), None);
    assert_eq!(
        shallow.walks(),
        walks + 1,
        "an id not found by incomplete walks is retried"
    );
    eprintln!(
        "{} cgroups resolved on {} (cache: {} cgroups)",
        cases.len(),
        resolver.mount().mount_point.display(),
        resolver.cached_len()
    );
}

#[test]
fn a_removed_cgroup_keeps_its_last_name() {
    require_tool("stat");
    let mut tree = TestCgroups::create();
    let mut resolver = CgroupResolver::new(ResolverConfig {
        rescan_interval: Duration::ZERO,
        ..ResolverConfig::default()
    })
    .expect("resolver");
    let rel = format!("system.slice/docker-{ID1}.scope");
    tree.spawn_in(&rel);
    let id = stat_inode(&tree.dir.join(&rel));
    let before = resolver.resolve(id).expect("resolved while it exists");
    assert_eq!(
        before.cgroup.workload.name,
        format!("docker/{}", &ID1[..12])
    );

    tree.remove(&rel);
    assert!(!tree.dir.join(&rel).exists(), "cgroup still there");
    // A complete walk no longer finds it: it is flagged removed, with its last name.
    let walk = resolver.walk(Instant::now()).expect("walk");
    assert!(!walk.truncated);
    let after = resolver.resolve(id).expect("the last name is kept");
    assert!(after.removed);
    assert_eq!(after.cgroup, before.cgroup);

    // A cgroup removed before anyone asked for it cannot be named, and is not walked for again.
    let rel = "system.slice/tracer-test-short-lived.service";
    tree.spawn_in(rel);
    let id = stat_inode(&tree.dir.join(rel));
    tree.remove(rel);
    assert_eq!(resolver.resolve(id), None);
    let walks = resolver.walks();
    assert_eq!(resolver.resolve(id), None);
    assert_eq!(resolver.walks(), walks, "walked again for an id known gone");
}
