//! Fixture paths as systemd, docker, containerd, cri-o, podman and the kubelet write them
//! (`/proc/<pid>/cgroup` on real hosts), and garbage.
use super::*;

const ID: &str = "3f4e2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const UID: &str = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn w(kind: WorkloadKind, name: &str) -> Workload {
    Workload::bare(kind, name.to_owned())
}

fn unit(kind: WorkloadKind, name: &str, unit: &str, uid: Option<u32>) -> Workload {
    Workload {
        unit: Some(unit.to_owned()),
        uid,
        ..w(kind, name)
    }
}

fn container(runtime: Runtime, id: &str, name: &str) -> Workload {
    Workload {
        container_id: Some(id.to_owned()),
        runtime: Some(runtime),
        ..w(WorkloadKind::Container, name)
    }
}

fn pod(qos: Qos, container: Option<(Option<Runtime>, &str)>) -> Workload {
    Workload {
        pod_uid: Some(UID.to_owned()),
        qos: Some(qos),
        container_id: container.map(|(_, id)| id.to_owned()),
        runtime: container.and_then(|(runtime, _)| runtime),
        ..w(WorkloadKind::Pod, &format!("pod/{UID}"))
    }
}

fn fixtures() -> Vec<(String, Workload)> {
    use Qos::*;
    use Runtime::*;
    use WorkloadKind::*;
    let uid_ = UID.replace('-', "_");
    let short = &ID[..12];
    vec![
        // The root cgroup, as /proc writes it and as a resolver may hand it over.
        ("/".into(), w(Root, "/")),
        ("".into(), w(Root, "/")),
        ("//".into(), w(Root, "/")),
        // systemd system services.
        (
            "/system.slice/nginx.service".into(),
            unit(Service, "nginx.service", "nginx.service", None),
        ),
        (
            "system.slice/nginx.service".into(),
            unit(Service, "nginx.service", "nginx.service", None),
        ),
        (
            "/system.slice/system-getty.slice/getty@tty1.service".into(),
            unit(Service, "getty@tty1.service", "getty@tty1.service", None),
        ),
        (
            "/system.slice/system-postgresql.slice/postgresql@16-main.service".into(),
            unit(
                Service,
                "postgresql@16-main.service",
                "postgresql@16-main.service",
                None,
            ),
        ),
        // A service with a delegated subtree: the processes sit below the unit.
        (
            "/system.slice/foo.service/payload".into(),
            unit(Service, "foo.service", "foo.service", None),
        ),
        // dockerd and containerd themselves are services, not containers.
        (
            "/system.slice/docker.service".into(),
            unit(Service, "docker.service", "docker.service", None),
        ),
        (
            "/system.slice/containerd.service".into(),
            unit(Service, "containerd.service", "containerd.service", None),
        ),
        // Scopes.
        (
            "/init.scope".into(),
            unit(Scope, "init.scope", "init.scope", None),
        ),
        (
            "/system.slice/run-r2b7e3f0c1d6e4a5b8c9d0e1f2a3b4c5d.scope".into(),
            unit(
                Scope,
                "run-r2b7e3f0c1d6e4a5b8c9d0e1f2a3b4c5d.scope",
                "run-r2b7e3f0c1d6e4a5b8c9d0e1f2a3b4c5d.scope",
                None,
            ),
        ),
        // User sessions, the user manager and user units (template ones included).
        (
            "/user.slice/user-1000.slice/session-3.scope".into(),
            unit(
                Session,
                "user-1000/session-3.scope",
                "session-3.scope",
                Some(1000),
            ),
        ),
        (
            "/user.slice/user-0.slice/session-c1.scope".into(),
            unit(Session, "user-0/session-c1.scope", "session-c1.scope", Some(0)),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/init.scope".into(),
            unit(Scope, "user-1000/init.scope", "init.scope", Some(1000)),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service".into(),
            unit(Service, "user@1000.service", "user@1000.service", Some(1000)),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service".into(),
            unit(Service, "user-1000/foo.service", "foo.service", Some(1000)),
        ),
        (
            "/user.slice/user-1001.slice/user@1001.service/session.slice/pipewire.service".into(),
            unit(Service, "user-1001/pipewire.service", "pipewire.service", Some(1001)),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome\\x2dterminal@1.service"
                .into(),
            unit(
                Service,
                "user-1000/app-gnome\\x2dterminal@1.service",
                "app-gnome\\x2dterminal@1.service",
                Some(1000),
            ),
        ),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-5c1f.scope"
                .into(),
            unit(
                Scope,
                "user-1000/vte-spawn-5c1f.scope",
                "vte-spawn-5c1f.scope",
                Some(1000),
            ),
        ),
        // Slices with processes directly in them.
        ("/system.slice".into(), w(Slice, "system.slice")),
        (
            "/user.slice/user-1000.slice".into(),
            Workload {
                uid: Some(1000),
                ..w(Slice, "user-1000.slice")
            },
        ),
        // Docker: cgroupfs driver, systemd driver, docker in docker (the outer one counts).
        (format!("/docker/{ID}"), container(Docker, ID, &format!("docker/{short}"))),
        (
            format!("/system.slice/docker-{ID}.scope"),
            container(Docker, ID, &format!("docker/{short}")),
        ),
        (
            format!("/docker/{ID}/docker/{ID2}"),
            container(Docker, ID, &format!("docker/{short}")),
        ),
        (
            format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service"),
            container(Docker, ID, &format!("docker/{short}")),
        ),
        // containerd (nerdctl) and cri-o outside Kubernetes.
        (
            format!("/system.slice/nerdctl-{ID}.scope"),
            container(Containerd, ID, &format!("containerd/{short}")),
        ),
        (
            format!("/system.slice/cri-containerd-{ID}.scope"),
            container(Containerd, ID, &format!("containerd/{short}")),
        ),
        (
            format!("/system.slice/crio-{ID}.scope"),
            container(CriO, ID, &format!("cri-o/{short}")),
        ),
        // Podman: rootful (machine.slice), in a pod, rootless, cgroupfs driver, and a quadlet
        // (a container run by a service: the service names it).
        (
            format!("/machine.slice/libpod-{ID}.scope"),
            container(Podman, ID, &format!("podman/{short}")),
        ),
        (
            format!("/machine.slice/libpod-{ID}.scope/container"),
            container(Podman, ID, &format!("podman/{short}")),
        ),
        (
            format!("/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope"),
            container(Podman, ID, &format!("podman/{short}")),
        ),
        (
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
            ),
            Workload {
                uid: Some(1000),
                unit: Some("user@1000.service".into()),
                ..container(Podman, ID, &format!("podman/{short}"))
            },
        ),
        (
            format!("/libpod_parent/libpod-{ID}"),
            container(Podman, ID, &format!("podman/{short}")),
        ),
        (
            format!("/system.slice/myapp.service/libpod-payload-{ID}"),
            Workload {
                unit: Some("myapp.service".into()),
                ..container(Podman, ID, "myapp.service")
            },
        ),
        // Runtime monitors are scopes, not containers.
        (
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            unit(
                Scope,
                &format!("libpod-conmon-{ID}.scope"),
                &format!("libpod-conmon-{ID}.scope"),
                None,
            ),
        ),
        // Kubernetes, systemd driver: each QoS class, each runtime, the pod's own slice, and a
        // cri-o monitor inside a pod.
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
            ),
            pod(Burstable, Some((Some(Containerd), ID))),
        ),
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"
            ),
            pod(BestEffort, Some((Some(CriO), ID))),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/docker-{ID}.scope"),
            pod(Guaranteed, Some((Some(Docker), ID))),
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"),
            pod(Burstable, None),
        ),
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{ID}.scope"
            ),
            pod(Burstable, None),
        ),
        // kind nodes and kubelets with a cgroup root: kubepods below another cgroup.
        (
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
            ),
            pod(BestEffort, Some((Some(Containerd), ID))),
        ),
        // Kubernetes, cgroupfs driver: the container is a bare id, the runtime unnamed.
        (
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            pod(Burstable, Some((None, ID))),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            pod(BestEffort, Some((None, ID))),
        ),
        (
            format!("/kubepods/pod{UID}/{ID}"),
            pod(Guaranteed, Some((None, ID))),
        ),
        (format!("/kubepods/pod{UID}"), pod(Guaranteed, None)),
        (
            format!("/kube/kubepods/burstable/pod{UID}/{ID}"),
            pod(Burstable, Some((None, ID))),
        ),
        // A static pod's uid is a 32-digit hash; upper case is folded.
        (
            "/kubepods/burstable/podD41D8CD98F00B204E9800998ECF8427E".into(),
            Workload {
                pod_uid: Some("d41d8cd98f00b204e9800998ecf8427e".into()),
                qos: Some(Burstable),
                ..w(Pod, "pod/d41d8cd98f00b204e9800998ecf8427e")
            },
        ),
        // Kubernetes layers without a pod.
        ("/kubepods.slice".into(), w(Slice, "kubepods.slice")),
        (
            "/kubepods.slice/kubepods-burstable.slice".into(),
            w(Slice, "kubepods-burstable.slice"),
        ),
        ("/kubepods/burstable".into(), w(Other, "/kubepods/burstable")),
        // Garbage and things no rule knows.
        ("/mygroup".into(), w(Other, "/mygroup")),
        ("/other".into(), w(Other, "/other")),
        ("/a/b/c".into(), w(Other, "/a/b/c")),
        ("/../etc".into(), w(Other, "/../etc")),
        ("/./system.slice/x.service".into(), w(Other, "/./system.slice/x.service")),
        ("/sys\ntem.slice/x.service".into(), w(Other, "/sys\ntem.slice/x.service")),
        ("/.service".into(), w(Other, "/.service")),
        ("/.slice".into(), w(Other, "/.slice")),
        // A /proc line is not a path; its tail is still read as one.
        ("0::/system.slice".into(), w(Slice, "system.slice")),
        // Near misses: ids of the wrong length or case, a `docker` without an id, a uid that
        // is no number, a pod uid with a stray character.
        (
            format!("/docker/{}", &ID[..63]),
            w(Other, &format!("/docker/{}", &ID[..63])),
        ),
        (
            format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            unit(
                Scope,
                &format!("docker-{}.scope", ID.to_uppercase()),
                &format!("docker-{}.scope", ID.to_uppercase()),
                None,
            ),
        ),
        ("/docker".into(), w(Other, "/docker")),
        (
            "/user.slice/user-abc.slice/session-1.scope".into(),
            unit(Scope, "session-1.scope", "session-1.scope", None),
        ),
        (
            "/kubepods/burstable/podxyz/".into(),
            w(Other, "/kubepods/burstable/podxyz"),
        ),
    ]
}

#[test]
fn fixture_paths_name_their_workload() {
    let fixtures = fixtures();
    let mut failures = Vec::new();
    for (path, expected) in &fixtures {
        let got = Workload::from_cgroup_path(path);
        if got != *expected {
            failures.push(format!(
                "{path:?}\n  got      {got:?}\n  expected {expected:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures wrong:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn no_name_is_the_folded_label_and_every_name_is_bounded() {
    let long = format!("/{}", "a".repeat(300));
    let multibyte = format!("/system.slice/{}.service", "é".repeat(100));
    let mut paths: Vec<String> = fixtures().into_iter().map(|(p, _)| p).collect();
    paths.extend([long.clone(), multibyte]);
    for path in &paths {
        let workload = Workload::from_cgroup_path(path);
        assert_ne!(workload.name, top::OTHER, "{path:?}");
        assert!(!workload.name.is_empty(), "{path:?}");
        assert!(workload.name.len() <= MAX_NAME_LEN, "{path:?}");
    }
    assert_eq!(Workload::from_cgroup_path(&long).name, long[..MAX_NAME_LEN]);
}

#[test]
fn serializes_as_flat_event_fields_with_nulls_for_the_unknown() {
    let path = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
        UID.replace('-', "_")
    );
    let json = serde_json::to_value(Workload::from_cgroup_path(&path)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "workload_kind": "pod",
            "workload": format!("pod/{UID}"),
            "unit": null,
            "uid": null,
            "container_id": ID,
            "runtime": "cri-o",
            "pod_uid": UID,
            "qos": "besteffort",
        })
    );
    let json = serde_json::to_value(Workload::from_cgroup_path(
        "/user.slice/user-1000.slice/session-3.scope",
    ))
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "workload_kind": "session",
            "workload": "user-1000/session-3.scope",
            "unit": "session-3.scope",
            "uid": 1000,
            "container_id": null,
            "runtime": null,
            "pod_uid": null,
            "qos": null,
        })
    );
}
