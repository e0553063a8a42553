//! `exec --user USER[:GROUP]`: running the server without root.

use std::{ffi::CString, io, os::unix::process::CommandExt, process::Command};

use anyhow::{Result, bail};

/// Who the server runs as: resolved before anything is created, applied in
/// the child between fork and exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups: the user's, from the group database.
    pub groups: Vec<libc::gid_t>,
}

/// A passwd entry's name, uid and primary gid.
fn passwd(user: &str) -> Result<Option<(CString, libc::uid_t, libc::gid_t)>> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data the libc fills.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = if let Ok(uid) = user.parse::<libc::uid_t>() {
        // SAFETY: valid out-pointers and buffer of the given length.
        unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) }
    } else {
        let c = CString::new(user)?;
        // SAFETY: as above, with a NUL-terminated name.
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) }
    };
    if rc != 0 {
        bail!("looking up user {user:?}: {}", io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Ok(None);
    }
    // SAFETY: the libc filled `entry` with a NUL-terminated name in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) }.to_owned();
    Ok(Some((name, entry.pw_uid, entry.pw_gid)))
}

fn group(group: &str) -> Result<Option<libc::gid_t>> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(Some(gid));
    }
    let c = CString::new(group)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: group is plain data the libc fills.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid out-pointers, NUL-terminated name, buffer of that length.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 {
        bail!("looking up group {group:?}: {}", io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some(entry.gr_gid))
}

impl Credentials {
    /// Resolves `USER[:GROUP]` (names or numeric ids; the user must exist).
    pub fn resolve(spec: &str) -> Result<Self> {
        let (user, group_name) = spec.split_once(':').map_or((spec, None), |(u, g)| (u, Some(g)));
        let Some((name, uid, primary)) = passwd(user)? else {
            bail!("no user {user:?} on this system; give an existing user for --user, e.g. --user nobody");
        };
        let gid = match group_name {
            None => primary,
            Some(g) => match group(g)? {
                Some(gid) => gid,
                None => bail!("no group {g:?} on this system; give an existing group in --user USER:GROUP"),
            },
        };
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut count = groups.len() as libc::c_int;
        // SAFETY: NUL-terminated name; `groups` holds `count` entries.
        if unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) } < 0 {
            bail!("user {user:?} is in more than {} groups; give --user USER:GROUP", groups.len());
        }
        groups.truncate(count.max(0) as usize);
        Ok(Self { uid, gid, groups })
    }

    /// Makes the child `command` spawns take these credentials just before
    /// it executes its program (call after anything that needs root).
    pub fn drop_on_exec(&self, command: &mut Command) {
        let creds = self.clone();
        // SAFETY: between fork and exec only async-signal-safe syscalls are
        // made, on memory allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(creds.groups.len(), creds.groups.as_ptr()) != 0
                    || libc::setgid(creds.gid) != 0
                    || libc::setuid(creds.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_unknown_names_fail_clearly() {
        let root = Credentials::resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(Credentials::resolve("0:0").unwrap().uid, 0);
        let e = Credentials::resolve("no-such-user-connlimit").unwrap_err().to_string();
        assert!(e.contains("no user \"no-such-user-connlimit\""), "{e}");
        let e = Credentials::resolve("root:no-such-group-connlimit").unwrap_err().to_string();
        assert!(e.contains("no group \"no-such-group-connlimit\""), "{e}");
    }
}
