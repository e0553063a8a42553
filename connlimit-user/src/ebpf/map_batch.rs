//! A whole array map read with one `BPF_MAP_LOOKUP_BATCH` system call
//! (arrays since Linux 5.6), which aya 0.14 does not wrap. Reading the
//! 65,536 entries of `PORTS` one lookup (one system call) each took about
//! 70 ms on a small VM; the batch takes about 14 ms, all of it the kernel
//! visiting each entry.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` part of `union bpf_attr` (`BPF_MAP_*_BATCH` commands), all
/// of it: the kernel reads anything past the size given as zero.
#[repr(C)]
struct Batch {
    /// Where to start: the last key of the previous batch, or null to start
    /// at the beginning.
    in_batch: u64,
    /// Out: the last key read, for the next call's `in_batch`.
    out_batch: u64,
    /// Out: the keys read, `count` of them.
    keys: u64,
    /// Out: their values, `count` of them, each the map's value size.
    values: u64,
    /// In: room in `keys` and `values`; out: how many were read.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every value of the array map `map`, in index order. Fails unless `map`
/// is a plain (not per-CPU) array of `V`: a per-CPU array's values are
/// laid out per CPU.
pub(crate) fn array_values<V: Pod>(map: &MapData) -> io::Result<Vec<V>> {
    read_array(map, usize::MAX)
}

/// [`array_values`], asking for at most `batch` entries per system call.
fn read_array<V: Pod>(map: &MapData, batch: usize) -> io::Result<Vec<V>> {
    let info = map.info().map_err(io::Error::other)?;
    if info.map_type().ok() != Some(aya::maps::MapType::Array)
        || info.key_size() as usize != size_of::<u32>()
        || info.value_size() as usize != size_of::<V>()
    {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an array map of this value type"));
    }
    let len = info.max_entries() as usize;
    let mut keys = vec![0u32; len];
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(len);
    let mut read = 0;
    // The last key read: where the next batch starts.
    let mut cursor = 0u32;
    while read < len {
        let mut attr = Batch {
            in_batch: if read == 0 { 0 } else { &raw const cursor as u64 },
            out_batch: &raw mut cursor as u64,
            keys: keys[read..].as_mut_ptr() as u64,
            values: values.spare_capacity_mut().as_mut_ptr() as u64,
            count: (len - read).min(batch) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` and `values` have room for `count` keys and values
        // of the map's sizes (checked above), and `cursor` for one key; all
        // outlive the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<Batch>() as libc::c_uint)
        };
        let error = (rc != 0).then(io::Error::last_os_error);
        // The kernel reports how many it read, also when it fails part-way.
        let n = (attr.count as usize).min(len - read);
        // SAFETY: the kernel wrote the first `n` values.
        unsafe { values.set_len(read + n) };
        read += n;
        match error {
            None if n > 0 => {}
            // Past the last index: ENOENT, with what was read before it.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
            None => break,
        }
    }
    // Arrays hold every index, in order; anything else is not an array.
    if read != len || keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
        return Err(io::Error::other(format!("a batch read of {len} array entries returned {read}, out of order")));
    }
    // SAFETY: all `len` values were written by the kernel (checked above);
    // `V` is plain data, any bytes of its size are one.
    Ok(values.into_iter().map(|v| unsafe { v.assume_init() }).collect())
}

#[cfg(test)]
mod tests {
    use aya::maps::{Array, IterableMap};

    use super::*;

    /// Creating a map needs CAP_BPF: skipped without it (CI runs as root).
    fn array<V: Pod>(len: u32) -> Option<Array<MapData, V>> {
        match Array::create(len, 0) {
            Ok(array) => Some(array),
            Err(e) => {
                eprintln!("skipped: cannot create a BPF map ({e}); run as root");
                None
            }
        }
    }

    #[test]
    fn reads_every_entry_in_order() {
        let Some(mut ports) = array::<u8>(65_536) else { return };
        for port in [1u32, 80, 443, 65_535] {
            ports.set(port, 1, 0).unwrap();
        }
        let values = array_values::<u8>(ports.map()).unwrap();
        assert_eq!(values.len(), 65_536);
        let on: Vec<usize> = values.iter().enumerate().filter(|(_, v)| **v != 0).map(|(i, _)| i).collect();
        assert_eq!(on, [1, 80, 443, 65_535]);
    }

    #[test]
    fn reads_in_several_batches() {
        let Some(mut table) = array::<u32>(1000) else { return };
        for i in 0..1000 {
            table.set(i, i * 7, 0).unwrap();
        }
        let expected: Vec<u32> = (0..1000).map(|i| i * 7).collect();
        for batch in [1, 3, 999, 1000, 1001] {
            assert_eq!(read_array::<u32>(table.map(), batch).unwrap(), expected, "batches of {batch}");
        }
    }

    #[test]
    fn wider_values_and_the_wrong_type() {
        let Some(mut wide) = array::<u64>(3) else { return };
        wide.set(2, u64::MAX - 1, 0).unwrap();
        assert_eq!(array_values::<u64>(wide.map()).unwrap(), [0, 0, u64::MAX - 1]);
        assert!(array_values::<u8>(wide.map()).is_err());
        assert!(array_values::<u32>(wide.map()).is_err());
    }
}
