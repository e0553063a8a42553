//! One port, one instance per network namespace: checked on every path
//! that gives an instance ports (attach, adopt, `set --port`), under the
//! pin root's exclusive lock so two writers cannot both pass the check.

use super::{EbpfError, Instance, PinRoot, netns::NetnsId};

/// Sorted, deduplicated ports; fails on none or on port 0.
pub(crate) fn normalize_ports(ports: &[u16]) -> Result<Vec<u16>, EbpfError> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return Err(EbpfError::NoPorts);
    }
    if ports.contains(&0) {
        return Err(EbpfError::PortZero);
    }
    Ok(ports)
}

/// Fails if an instance other than `except` in namespace `netns` guards
/// one of `ports`.
pub(crate) fn refuse_taken_ports(
    root: &PinRoot,
    ports: &[u16],
    netns: NetnsId,
    except: Option<&str>,
) -> Result<(), EbpfError> {
    for other in root.names()? {
        if Some(other.as_str()) == except {
            continue;
        }
        let instance = match Instance::open_in(root, &other) {
            Ok(instance) => instance,
            Err(e) => {
                tracing::warn!(instance = %other, error = %e, "skipping an unreadable instance");
                continue;
            }
        };
        let info = instance.info()?;
        if (info.netns_dev, info.netns_ino) != (netns.dev, netns.ino) {
            continue;
        }
        for &port in ports {
            if instance.guards(port)? {
                return Err(EbpfError::PortTaken { port, instance: other });
            }
        }
    }
    Ok(())
}

impl Instance {
    /// Guards exactly `ports` from now on, like
    /// [`set_ports`](Self::set_ports), after checking that no other
    /// instance in the same network namespace guards one of them. `root`
    /// must be held for writing ([`PinRoot::write`]).
    pub fn replace_ports(&mut self, root: &PinRoot, ports: &[u16]) -> Result<(), EbpfError> {
        let ports = normalize_ports(ports)?;
        let info = self.info()?;
        let netns = NetnsId { dev: info.netns_dev, ino: info.netns_ino };
        refuse_taken_ports(root, &ports, netns, Some(self.name()))?;
        self.set_ports(&ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_sorted_deduplicated_and_checked() {
        assert_eq!(normalize_ports(&[443, 80, 443]).unwrap(), vec![80, 443]);
        assert!(matches!(normalize_ports(&[]), Err(EbpfError::NoPorts)));
        assert!(matches!(normalize_ports(&[80, 0]), Err(EbpfError::PortZero)));
    }
}
