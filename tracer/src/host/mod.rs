//! Stage 0, the host: what exists outside the event stream and is read on demand: the sockets
//! sock_diag lists (seeding, resync), the network namespaces, and the process that owns a socket
//! (from `/proc`). Slow lookups: never per event.
pub mod listeners;
pub mod namespaces;
pub mod owner_lookups;
pub mod proc_owners;
pub mod seeds;
pub mod sock_diag;
