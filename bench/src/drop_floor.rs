//! The floor of refusing in sk_lookup: a program of six instructions that
//! refuses every lookup for the guarded port (`SK_DROP`, which the kernel
//! answers with a RST) and counts nothing. Whatever a limiter on this hook
//! does per SYN comes on top of it. It does not check the protocol: only
//! TCP reaches the guarded port in the benchmark.
//!
//! It is loaded with the raw `bpf()` system call (no object file, no
//! toolchain) and attached to the namespace through a BPF link, which
//! detaches when its descriptor closes.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;
/// `offsetof(struct bpf_sk_lookup, local_port)`: host byte order.
const LOCAL_PORT_OFFSET: i16 = 60;
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;

// The encoding below (register nibbles, little-endian fields) is that of
// little-endian machines.
#[cfg(not(target_endian = "little"))]
compile_error!("drop_floor encodes BPF instructions for little-endian machines only");

/// One BPF instruction: opcode, registers (destination low, source high),
/// offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// `if (ctx->local_port != port) return SK_PASS; return SK_DROP;`
fn program(port: u16) -> [u64; 6] {
    const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
    const JNE_K: u8 = 0x55; // if r_dst != imm goto pc + off
    const MOV64_K: u8 = 0xb7; // r_dst = imm
    const EXIT: u8 = 0x95;
    [
        insn(LDX_W, 2, 1, LOCAL_PORT_OFFSET, 0),
        insn(JNE_K, 2, 0, 2, i32::from(port)),
        insn(MOV64_K, 0, 0, 0, SK_DROP),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The program, attached to a network namespace while this lives.
pub struct DropFloor {
    _link: OwnedFd,
    _program: OwnedFd,
}

impl DropFloor {
    /// Attaches to the namespace at `netns`, refusing lookups for `port`.
    pub fn attach(netns: &Path, port: u16) -> Result<Self> {
        let insns = program(port);
        let license = c"GPL";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, BPF_PROG_TYPE_SK_LOOKUP);
        put(&mut attr, 4, insns.len() as u32);
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..58].copy_from_slice(b"drop_floor");
        put(&mut attr, 68, BPF_SK_LOOKUP); // expected_attach_type
        // SAFETY: the instructions and the license outlive the call; no log buffer.
        let program = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }.context("loading the drop-floor sk_lookup program")?;
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let mut attr = [0u8; 128];
        put(&mut attr, 0, program.as_raw_fd() as u32);
        put(&mut attr, 4, ns.as_raw_fd() as u32);
        put(&mut attr, 8, BPF_SK_LOOKUP);
        // SAFETY: descriptors only, no pointers.
        let link = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }.context("attaching the drop-floor sk_lookup program")?;
        Ok(Self { _link: link, _program: program })
    }
}

fn put(attr: &mut [u8], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

/// A `bpf()` command that returns a new descriptor.
///
/// # Safety
/// `attr` is a `union bpf_attr` for `cmd`, zero where unused, and every
/// pointer in it is valid for the kernel to read (or write) for the call.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: see the function's contract.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r2 = *(u32 *)(r1 + 60): opcode 0x61, src 1 / dst 2, offset 60.
        assert_eq!(insn(0x61, 2, 1, 60, 0).to_le_bytes(), [0x61, 0x12, 60, 0, 0, 0, 0, 0]);
        // if r2 != 9000 goto +2 (past the SK_DROP return, to the SK_PASS one)
        let p = program(9000);
        assert_eq!(p[1].to_le_bytes(), [0x55, 0x02, 2, 0, 0x28, 0x23, 0, 0]);
        assert_eq!(p[2].to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p[4].to_le_bytes(), [0xb7, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!((p[3] & 0xff, p[5] & 0xff), (0x95, 0x95));
    }
}
