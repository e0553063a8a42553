//! What connlimit's kernel programs and its user space must agree on.
//!
//! Every map's key and value layout is defined here, once, and used by both
//! `connlimit-ebpf` (compiled for the BPF target, `no_std`) and
//! `connlimit-user`. So is the arithmetic both sides reason with:
//! how a client address becomes a [`ClientKey`](maps::ClientKey) ([`addr`]),
//! how a client's established connections are counted ([`established`]) and
//! how its handshakes in flight are packed into one atomic word ([`pending`]).
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod established;
pub mod maps;
pub mod pending;
