//! Which workload a cgroup v2 path names: a systemd service or scope, a user session, a
//! container (docker, containerd, cri-o, podman) or a Kubernetes pod, read from the path alone
//! (the names systemd, the container runtimes and the kubelet give their cgroups). Pure: the
//! host side (`tracer::host::cgroups`) finds the path of a socket's cgroup id.
//!
//! The rules, from the root of the path down:
//! - a Kubernetes pod: a `kubepods` component (cgroupfs driver: `kubepods/[burstable|besteffort/]pod<uid>/<id>`)
//!   or one ending in `kubepods.slice` (systemd driver:
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`),
//!   wherever it sits (kubelets with a `--cgroup-root`, kind nodes). Guaranteed pods sit directly
//!   under the kubepods cgroup.
//! - a container outside Kubernetes: the outermost `docker/<id>`, `docker-<id>.scope`,
//!   `cri-containerd-<id>.scope`, `nerdctl-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`,
//!   `libpod-<id>` or `libpod-payload-<id>` component (ids of 64 hex digits), named after the
//!   service right above it if there is one (a podman quadlet). Runtime monitors
//!   (`crio-conmon-…`, `libpod-conmon-…`) are scopes, not containers.
//! - otherwise the deepest systemd unit (`*.service`, `*.scope`) on the path: services (template
//!   instances such as `getty@tty1.service` included), user units under
//!   `user@<uid>.service/…`, sessions (`user-<uid>.slice/session-<n>.scope`) and other scopes.
//! - else a slice (a path ending in `*.slice`), the root cgroup, or `other`.
use serde::Serialize;
use strum::IntoStaticStr;

pub mod top;

/// The longest [`Workload::name`], in bytes; longer names are cut (on a character boundary).
pub const MAX_NAME_LEN: usize = 128;

/// What a cgroup path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, IntoStaticStr)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum WorkloadKind {
    /// The root cgroup: kernel threads, and every process on a host without a cgroup manager.
    Root,
    /// A systemd service, system or user (`unit`, and `uid` for a user's).
    Service,
    /// A login session, `session-<n>.scope` of user `uid`.
    Session,
    /// Another systemd scope (`init.scope`, `run-….scope`, a desktop application's scope).
    Scope,
    /// A slice with processes directly in it (rare: systemd puts processes in units).
    Slice,
    /// A container outside Kubernetes (`container_id`, `runtime`).
    Container,
    /// A Kubernetes pod (`pod_uid`, `qos`, and the container's `container_id` when known).
    Pod,
    /// A path none of the rules recognise (`name` is the path itself).
    Other,
}

/// The container runtime that named a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, IntoStaticStr)]
#[serde(into = "&'static str")]
pub enum Runtime {
    #[strum(serialize = "docker")]
    Docker,
    /// containerd, through its CRI plugin (`cri-containerd-`) or nerdctl.
    #[strum(serialize = "containerd")]
    Containerd,
    #[strum(serialize = "cri-o")]
    CriO,
    #[strum(serialize = "podman")]
    Podman,
}

/// A Kubernetes pod's quality-of-service class, from its cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, IntoStaticStr)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The workload a cgroup v2 path names. Serialized as the fields a JSON event carries (flat:
/// `workload` is the name, `workload_kind` the kind), every field present, `null` when the path
/// does not say (as the JSON events write unknown values).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    #[serde(rename = "workload_kind")]
    pub kind: WorkloadKind,
    /// A short human label, the value of the `workload` metric label: `nginx.service`,
    /// `user-1000/foo.service`, `user-1000/session-3.scope`, `docker/0123456789ab` (the
    /// runtime and the container id's first 12 digits), `pod/<uid>`, a slice's name, `/` for the
    /// root cgroup, and the path itself (starting with `/`) for `other`, so that no name is ever
    /// `other`, the label of the folded rest. At most [`MAX_NAME_LEN`] bytes.
    #[serde(rename = "workload")]
    pub name: String,
    /// The systemd unit (service or scope) holding the cgroup, if any.
    pub unit: Option<String>,
    /// The user of a user's unit, session or slice (`user-<uid>.slice`, `user@<uid>.service`).
    pub uid: Option<u32>,
    /// The full container id (64 hex digits).
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// The Kubernetes pod's uid, with dashes (the systemd driver writes them as `_`).
    pub pod_uid: Option<String>,
    pub qos: Option<Qos>,
}

impl Workload {
    /// The workload named by `path`, a cgroup v2 path from the hierarchy's root as
    /// `/proc/<pid>/cgroup` writes it (`/system.slice/nginx.service`; the leading `/` is
    /// optional). Never fails: what no rule recognises is [`WorkloadKind::Other`].
    pub fn from_cgroup_path(path: &str) -> Workload {
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        if parts.is_empty() {
            return Workload::bare(WorkloadKind::Root, "/".to_owned());
        }
        let sane = parts
            .iter()
            .all(|c| *c != "." && *c != ".." && !c.chars().any(char::is_control));
        if !sane {
            return Workload::other(&parts);
        }
        if let Some(pod) = kubernetes(&parts) {
            return pod;
        }
        let uid = parts.iter().find_map(|c| user_uid(c));
        let container = parts
            .iter()
            .enumerate()
            .find_map(|(i, c)| container(c, parts.get(i + 1).copied()).map(|found| (i, found)));
        // Units above the container (a container started by a service, such as a podman
        // quadlet), or on the whole path.
        let above = container.as_ref().map_or(parts.len(), |(i, _)| *i);
        let unit = parts
            .get(..above)
            .unwrap_or_default()
            .iter()
            .rev()
            .find(|c| is_unit(c))
            .map(|c| (*c).to_owned());
        if let Some((at, (runtime, id))) = container {
            // A container whose cgroup a service made for it (a podman quadlet) is known by the
            // service's name; a user's manager is not such a service.
            let parent = at.checked_sub(1).and_then(|i| parts.get(i));
            let name = match parent {
                Some(p) if p.ends_with(".service") && user_uid(p).is_none() && is_unit(p) => {
                    unit_name(p, uid)
                }
                _ => container_name(runtime, id),
            };
            return Workload {
                runtime: Some(runtime),
                container_id: Some(id.to_owned()),
                unit,
                uid,
                ..Workload::bare(WorkloadKind::Container, name)
            };
        }
        if let Some(unit) = unit {
            let kind = if unit.ends_with(".service") {
                WorkloadKind::Service
            } else if uid.is_some() && is_session(&unit) {
                WorkloadKind::Session
            } else {
                WorkloadKind::Scope
            };
            return Workload {
                uid,
                ..Workload::bare(kind, unit_name(&unit, uid))
            }
            .with_unit(unit);
        }
        match parts.last() {
            Some(last) if last.ends_with(".slice") && last.len() > ".slice".len() => Workload {
                uid,
                ..Workload::bare(WorkloadKind::Slice, bounded((*last).to_owned()))
            },
            _ => Workload::other(&parts),
        }
    }

    fn bare(kind: WorkloadKind, name: String) -> Workload {
        Workload {
            kind,
            name,
            unit: None,
            uid: None,
            container_id: None,
            runtime: None,
            pod_uid: None,
            qos: None,
        }
    }

    fn other(parts: &[&str]) -> Workload {
        Workload::bare(
            WorkloadKind::Other,
            bounded(format!("/{}", parts.join("/"))),
        )
    }

    fn with_unit(self, unit: String) -> Workload {
        Workload {
            unit: Some(unit),
            ..self
        }
    }
}

/// A Kubernetes pod, from the components below the kubepods cgroup.
fn kubernetes(parts: &[&str]) -> Option<Workload> {
    let root = parts
        .iter()
        .position(|c| *c == "kubepods" || c.ends_with("kubepods.slice"))?;
    let below = parts.get(root + 1..).unwrap_or_default();
    let (pod_at, uid) = below
        .iter()
        .enumerate()
        .find_map(|(i, c)| pod_uid(c).map(|uid| (i, uid)))?;
    // The QoS class is named by the cgroups between kubepods and the pod (and, with the
    // systemd driver, by the pod's own slice); guaranteed pods have none.
    let qos_named = |word: &str| {
        below
            .get(..=pod_at)
            .unwrap_or_default()
            .iter()
            .any(|c| c.contains(word))
    };
    let qos = if qos_named("besteffort") {
        Qos::BestEffort
    } else if qos_named("burstable") {
        Qos::Burstable
    } else {
        Qos::Guaranteed
    };
    let container = below
        .get(pod_at + 1)
        .and_then(|c| pod_container(c, below.get(pod_at + 2).copied()));
    let name = bounded(format!("pod/{uid}"));
    Some(Workload {
        pod_uid: Some(uid),
        qos: Some(qos),
        container_id: container.map(|(_, id)| id.to_owned()),
        runtime: container.and_then(|(runtime, _)| runtime),
        ..Workload::bare(WorkloadKind::Pod, name)
    })
}

/// The pod uid in a pod's cgroup name: `kubepods-burstable-pod<uid with _>.slice` (systemd
/// driver) or `pod<uid>` (cgroupfs driver).
fn pod_uid(component: &str) -> Option<String> {
    let raw = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => component.strip_prefix("pod")?,
    };
    // Uids are UUIDs; static pods' are hashes of their manifest (32 hex digits).
    let valid = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    valid.then(|| raw.replace('_', "-").to_ascii_lowercase())
}

/// A pod's container cgroup: a runtime's scope (systemd driver), or the bare container id
/// (cgroupfs driver, which does not name the runtime).
fn pod_container<'a>(
    component: &'a str,
    next: Option<&'a str>,
) -> Option<(Option<Runtime>, &'a str)> {
    if is_container_id(component) {
        return Some((None, component));
    }
    container(component, next).map(|(runtime, id)| (Some(runtime), id))
}

/// A container's cgroup outside Kubernetes; `next` is the component below (docker's cgroupfs
/// driver puts containers in `docker/<id>`).
fn container<'a>(component: &'a str, next: Option<&'a str>) -> Option<(Runtime, &'a str)> {
    if component == "docker" {
        return next
            .filter(|id| is_container_id(id))
            .map(|id| (Runtime::Docker, id));
    }
    const SCOPES: [(&str, Runtime); 6] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("nerdctl-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-payload-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
    ];
    // Podman's cgroupfs driver and cri-o's write the same names without `.scope`.
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    SCOPES.iter().find_map(|(prefix, runtime)| {
        stem.strip_prefix(prefix)
            .filter(|id| is_container_id(id))
            .map(|id| (*runtime, id))
    })
}

/// Container ids of docker, containerd, cri-o and podman: 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The uid of `user-<uid>.slice` or `user@<uid>.service`.
fn user_uid(component: &str) -> Option<u32> {
    let digits = component
        .strip_prefix("user-")
        .and_then(|rest| rest.strip_suffix(".slice"))
        .or_else(|| {
            component
                .strip_prefix("user@")
                .and_then(|rest| rest.strip_suffix(".service"))
        })?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn is_unit(component: &str) -> bool {
    [".service", ".scope"].iter().any(|suffix| {
        component
            .strip_suffix(suffix)
            .is_some_and(|stem| !stem.is_empty())
    })
}

fn is_session(unit: &str) -> bool {
    unit.strip_prefix("session-")
        .and_then(|rest| rest.strip_suffix(".scope"))
        .is_some_and(|id| !id.is_empty())
}

/// A unit's label: a user's units carry the user (`user-1000/foo.service`), since every user
/// runs their own `pipewire.service`; the user manager itself already names its user.
fn unit_name(unit: &str, uid: Option<u32>) -> String {
    match uid {
        Some(uid) if !unit.starts_with("user@") => bounded(format!("user-{uid}/{unit}")),
        _ => bounded(unit.to_owned()),
    }
}

fn container_name(runtime: Runtime, id: &str) -> String {
    let runtime: &'static str = runtime.into();
    format!("{runtime}/{}", id.get(..12).unwrap_or(id))
}

/// `name` cut to [`MAX_NAME_LEN`] bytes on a character boundary.
fn bounded(mut name: String) -> String {
    if name.len() > MAX_NAME_LEN {
        let mut end = MAX_NAME_LEN;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

#[cfg(test)]
mod tests;
