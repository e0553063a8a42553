//! The kernel limiter (Linux): the same limits as [`Limiter`](crate::Limiter),
//! enforced by eBPF for any server process, including ones that were never
//! written to know about it.
//!
//! An instance is two programs and their maps:
//!
//! - a `sock_ops` program on a cgroup v2 directory counts the established
//!   connections of the server processes in it, per client key, and sees
//!   each one close;
//! - an `sk_lookup` program on a network namespace refuses a new connection
//!   to a guarded port with an immediate RST when its client is at the
//!   limit. The server process never sees it.
//!
//! The maps and the programs' links are pinned under
//! `/sys/fs/bpf/connlimit/<name>/` (see [`mod@pin_root`]) so another process
//! (the `connlimit` CLI) can read counts and change the config live,
//! through [`Instance`], and so the kernel keeps enforcing if the process
//! that attached the instance crashes (see [`owner`]).
//!
//! ```no_run
//! use connlimit::{Config, ebpf::{AttachOptions, EbpfLimiter}};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The cgroup the server runs in, e.g. its systemd service's.
//! let cgroup = "/sys/fs/cgroup/system.slice/my-api.service";
//! let limiter = EbpfLimiter::attach(AttachOptions::new("my-api", cgroup).port(8080).config(Config::new(10)))?;
//! limiter.set_config(Config::new(20))?; // takes effect for the next SYN
//! for c in limiter.clients()? {
//!     println!("{} holds {} connections, {} refused", c.client, c.open, c.refused);
//! }
//! # Ok(()) }
//! ```
//!
//! The modules, one concept each:
//!
//! - [`EbpfLimiter`] and [`AttachOptions`] (`limiter`): the limiter a
//!   process owns; the loader (`loader`) loads the kernel object and
//!   attaches it.
//! - [`Instance`] (`instance`): the pinned instance directory and handles
//!   on its maps; its configuration as the kernel holds it
//!   (`kernel_config`) and what the kernel counts (`counts`).
//! - [`owner`], [`guard`](Instance::replace_ports), [`mod@pin_root`]: who owns
//!   an instance, one port per instance, the locked pin root.
//! - [`capabilities`], [`mounts`], [`netns`], [`clock`],
//!   [`kernel_features`]: facts about this machine checked or read before
//!   touching the kernel.

pub mod attachments;
mod bpf_sys;
pub mod capabilities;
pub mod cgroup;
pub mod clock;
mod counts;
mod error;
pub mod fds;
mod follow;
mod guard;
mod instance;
mod kernel_config;
pub mod kernel_features;
mod limiter;
pub mod listeners;
mod loader;
mod log;
mod map_batch;
pub mod mounts;
pub mod netns;
mod object;
pub mod owner;
pub mod pin_root;
mod responder;
pub mod sock_diag;
mod upkeep;

pub use counts::ClientCount;
pub use error::EbpfError;
pub use instance::Instance;
pub use kernel_config::{DEFAULT_RESERVATION_EPOCH, MAX_RESERVATION_EPOCH, MIN_RESERVATION_EPOCH, WhenFull};
pub use limiter::{AttachOptions, EbpfLimiter};
pub use object::{OBJECT_HASH, OBJECT_SHA256, hash_hex};
pub use owner::{Detached, Owner, Ownership};
pub use pin_root::{PIN_ROOT, PIN_ROOT_ENV, PinRoot, pin_root};
pub use responder::{BACKLOG, MAX_RESPONDING, RefuseWith, Responder, WRITE_DEADLINE};
pub use upkeep::Upkeep;
