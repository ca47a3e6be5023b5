//! Who may change the farm. Admin calls need `DROVER_ADMIN_TOKEN` and node joins need
//! `DROVER_NODE_TOKEN`; a door whose token is not set is in protected mode (as Redis does): it
//! opens to loopback callers only, unless the operator says `DROVER_INSECURE=1`. Refusals say
//! which setting opens them; the coordinator warns at start about every door that is not closed
//! by a token.

use std::net::IpAddr;

use crate::config::Config;
use crate::error::{CoordinatorError, Result};

/// A way in that changes the farm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// Admin calls (drain, resume).
    Admin,
    /// A node registering or opening its session.
    NodeJoin,
    /// A replica of a replicated coordinator calling its peers (its log, votes, status).
    Peer,
}

impl Door {
    fn token_setting(self) -> &'static str {
        match self {
            Self::Admin => "DROVER_ADMIN_TOKEN",
            Self::NodeJoin => "DROVER_NODE_TOKEN",
            Self::Peer => "DROVER_PEER_TOKEN",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Admin => "admin calls are",
            Self::NodeJoin => "node joins are",
            Self::Peer => "replica calls are",
        }
    }
}

/// Whether a caller at `peer` may use `door` while its token is not set: from loopback, or from
/// anywhere with `insecure`. The refusal names the settings that open it.
pub fn tokenless(door: Door, insecure: bool, peer: Option<IpAddr>) -> Result<()> {
    let loopback = peer.is_some_and(|ip| match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    });
    if insecure || loopback {
        return Ok(());
    }
    let from = peer.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string());
    Err(CoordinatorError::Forbidden(format!(
        "{} accepted from loopback only while {} is unset (this one came from {from}): set {} \
         on the coordinator{}, or DROVER_INSECURE=1 to open them to the network",
        door.what(),
        door.token_setting(),
        door.token_setting(),
        match door {
            Door::NodeJoin => " and the node",
            Door::Peer => " on every replica",
            Door::Admin => "",
        },
    )))
}

/// Logs one warning for every door a token does not close.
pub fn warn_open_doors(config: &Config) {
    for (door, token) in [
        (Door::Admin, &config.admin_token),
        (Door::NodeJoin, &config.node_token),
        (Door::Peer, &config.peer_token),
    ] {
        if token.is_some() || (door == Door::Peer && config.peers.is_none()) {
            continue;
        }
        let setting = door.token_setting();
        if config.insecure {
            tracing::warn!(
                setting,
                "{} open to the network without a token (DROVER_INSECURE): anyone who reaches this coordinator can {}",
                door.what(),
                match door {
                    Door::Admin => "drain and resume nodes",
                    Door::NodeJoin => "join as a node and receive prompts",
                    Door::Peer => "rewrite the replicated log",
                }
            );
        } else {
            tracing::warn!(
                setting,
                "{} accepted from loopback only: set {setting} to allow them from other machines",
                door.what()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenless_doors_open_to_loopback_only() {
        let local: [IpAddr; 3] = [
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])),
            "::1".parse().unwrap_or(IpAddr::from([0; 4])),
            "::ffff:127.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])),
        ];
        for ip in local {
            assert!(tokenless(Door::Admin, false, Some(ip)).is_ok(), "{ip}");
        }
        let remote: IpAddr = "10.1.2.3".parse().unwrap_or(IpAddr::from([0; 4]));
        for door in [Door::Admin, Door::NodeJoin] {
            let refused = tokenless(door, false, Some(remote)).expect_err("refused");
            let text = refused.to_string();
            assert!(
                text.contains("10.1.2.3") && text.contains("DROVER_INSECURE=1"),
                "{text}"
            );
            assert!(text.contains(door.token_setting()), "{text}");
            assert_eq!(refused.code().http_status(), 403);
            assert!(tokenless(door, false, None).is_err());
            assert!(tokenless(door, true, Some(remote)).is_ok());
        }
    }
}
