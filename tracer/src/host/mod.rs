//! Stage 0, the host: what exists outside the event stream and is read on demand: the sockets
//! sock_diag lists (seeding, resync), the network namespaces, the process that owns a socket
//! (from `/proc`), the cgroup a cgroup id names, and listeners' accept queues. Slow lookups:
//! never per event.
pub mod cgroups;
pub mod hz;
pub mod listeners;
pub mod namespaces;
pub mod owner_lookups;
pub mod proc_owners;
pub mod seeds;
pub mod sock_diag;
pub mod workloads;
