//! The pure decisions of scale-out and shrink: what a standby agent's answer means, which
//! shrink numbers are valid and which nodes they take, when a stage's wait is over.
//!
//! Architecture Invariant: no IO, no clock, no scheduler lock: everything arrives as
//! arguments, so every rule here is a unit test away.

use lull_shared::NodeStatus;
use lull_shared::standby::{StandbyHello, StandbyState};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// One scale-out group as shrink sees it: its id (groups join in id order) and its members.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMembers {
    pub group_id: i64,
    pub node_ids: Vec<String>,
}

/// The shrink numbers that take whole groups, newest first: the sizes of the newest group,
/// of the newest two together, and so on (seed 003: after scaling out 3 then 4 nodes, 4 or
/// 7 may be shrunk).
pub fn valid_shrink_numbers(groups: &[GroupMembers]) -> Vec<usize> {
    let mut sorted: Vec<&GroupMembers> = groups.iter().filter(|g| !g.node_ids.is_empty()).collect();
    sorted.sort_by_key(|g| std::cmp::Reverse(g.group_id));
    let mut total = 0;
    sorted
        .iter()
        .map(|g| {
            total += g.node_ids.len();
            total
        })
        .collect()
}

/// A shrink number that does not end on a group boundary.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", invalid_shrink_detail(*.shrink_number, valid))]
pub struct InvalidShrink {
    pub shrink_number: i64,
    pub valid: Vec<usize>,
}

fn invalid_shrink_detail(shrink_number: i64, valid: &[usize]) -> String {
    if valid.is_empty() {
        return format!(
            "shrink_number {shrink_number} is not valid: the cluster has no nodes to shrink"
        );
    }
    let list: Vec<String> = valid.iter().map(usize::to_string).collect();
    format!(
        "shrink_number {shrink_number} does not match whole scale-out groups, newest first; valid numbers: {}",
        list.join(", ")
    )
}

/// The nodes a shrink of `shrink_number` removes: the newest groups whose sizes add up to
/// it exactly, with their group ids (newest first).
pub fn select_for_shrink(
    groups: &[GroupMembers],
    shrink_number: usize,
) -> Result<(Vec<String>, Vec<i64>), InvalidShrink> {
    let mut sorted: Vec<&GroupMembers> = groups.iter().filter(|g| !g.node_ids.is_empty()).collect();
    sorted.sort_by_key(|g| std::cmp::Reverse(g.group_id));
    let mut nodes = Vec::new();
    let mut group_ids = Vec::new();
    for group in sorted {
        if nodes.len() >= shrink_number {
            break;
        }
        nodes.extend(group.node_ids.iter().cloned());
        group_ids.push(group.group_id);
    }
    if shrink_number == 0 || nodes.len() != shrink_number {
        return Err(InvalidShrink {
            shrink_number: i64::try_from(shrink_number).unwrap_or(i64::MAX),
            valid: valid_shrink_numbers(groups),
        });
    }
    Ok((nodes, group_ids))
}

/// Why a standby agent cannot be adopted, from its hello and what the coordinator knows of
/// its node id (`None`: never seen).
pub fn check_hello(
    address: &str,
    hello: &StandbyHello,
    known: Option<NodeStatus>,
) -> Result<(), String> {
    if hello.state != StandbyState::Standby {
        return Err(format!(
            "already a member: the agent at {address} (node {}) is {} by {}",
            hello.node_id,
            hello.state.as_str(),
            hello
                .coordinator
                .as_deref()
                .unwrap_or("another coordinator")
        ));
    }
    if let Some(status) = known
        && !matches!(status, NodeStatus::Removed | NodeStatus::Offline)
    {
        return Err(format!(
            "already a member: node {} (the agent at {address}) is {status} in this cluster",
            hello.node_id
        ));
    }
    if hello.node_id.trim().is_empty() || hello.challenge.trim().is_empty() {
        return Err(format!(
            "the agent at {address} answered without a node id or challenge"
        ));
    }
    Ok(())
}

/// One agent named in a scale-out request.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentAddress {
    pub ip: IpAddr,
    pub port: u16,
}

impl AgentAddress {
    pub fn display(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// Two agents of one scale-out that are the same agent, by address or node id.
pub fn duplicate_agents<'a>(
    addresses: &[AgentAddress],
    node_ids: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut seen = BTreeMap::new();
    for a in addresses {
        if seen.insert(a.display(), ()).is_some() {
            return Some(format!("agent {} is named twice", a.display()));
        }
    }
    let mut ids = BTreeMap::new();
    for id in node_ids {
        if ids.insert(id, ()).is_some() {
            return Some(format!(
                "node {id} is named twice (two addresses, one agent)"
            ));
        }
    }
    None
}

/// Where the nodes of a shrink stand in their drain: the ones still holding runs.
pub fn still_running<'a>(
    nodes: impl IntoIterator<Item = (&'a str, NodeStatus, usize)>,
) -> Vec<String> {
    nodes
        .into_iter()
        .filter(|(_, status, runs)| {
            *runs > 0 && !matches!(status, NodeStatus::Offline | NodeStatus::Removed)
        })
        .map(|(id, _, _)| id.to_string())
        .collect()
}

/// The nodes of a shrink that have not left yet (an agent that said goodbye, or went
/// silent, is `offline`).
pub fn not_left<'a>(nodes: impl IntoIterator<Item = (&'a str, NodeStatus)>) -> Vec<String> {
    nodes
        .into_iter()
        .filter(|(_, status)| !matches!(status, NodeStatus::Offline | NodeStatus::Removed))
        .map(|(id, _)| id.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(sizes: &[(i64, usize)]) -> Vec<GroupMembers> {
        sizes
            .iter()
            .map(|(id, n)| GroupMembers {
                group_id: *id,
                node_ids: (0..*n).map(|i| format!("g{id}-n{i}")).collect(),
            })
            .collect()
    }

    #[test]
    fn valid_numbers_are_sums_of_the_newest_groups() {
        // Seed 003's example: 3 nodes, then 4 → 4 or 7.
        assert_eq!(valid_shrink_numbers(&groups(&[(1, 3), (2, 4)])), vec![4, 7]);
        // Order of the input does not matter; ids say which is newer.
        assert_eq!(
            valid_shrink_numbers(&groups(&[(5, 1), (2, 2), (9, 2)])),
            vec![2, 3, 5]
        );
        assert_eq!(valid_shrink_numbers(&groups(&[(1, 0), (2, 1)])), vec![1]);
        assert!(valid_shrink_numbers(&[]).is_empty());
    }

    #[test]
    fn selection_takes_whole_newest_groups() {
        let g = groups(&[(1, 3), (2, 4), (3, 1)]);
        let (nodes, ids) = select_for_shrink(&g, 1).expect("newest alone");
        assert_eq!((nodes, ids), (vec!["g3-n0".to_string()], vec![3]));
        let (nodes, ids) = select_for_shrink(&g, 5).expect("newest two");
        assert_eq!(nodes.len(), 5);
        assert_eq!(ids, vec![3, 2]);
        let (nodes, _) = select_for_shrink(&g, 8).expect("all");
        assert_eq!(nodes.len(), 8);
    }

    #[test]
    fn a_number_inside_a_group_is_refused_with_the_valid_ones() {
        let g = groups(&[(1, 3), (2, 4)]);
        for n in [0, 1, 3, 5, 8] {
            let err = select_for_shrink(&g, n).expect_err("not on a boundary");
            assert_eq!(err.valid, vec![4, 7]);
            assert!(err.to_string().contains("valid numbers: 4, 7"), "{err}");
        }
        let err = select_for_shrink(&[], 1).expect_err("nothing to shrink");
        assert!(err.to_string().contains("no nodes"), "{err}");
    }

    fn hello(state: StandbyState) -> StandbyHello {
        StandbyHello {
            state,
            node_id: "n1".into(),
            challenge: "c".into(),
            version: "0".into(),
            coordinator: Some("http://c1".into()),
        }
    }

    #[test]
    fn only_a_standby_agent_that_is_not_a_member_may_be_adopted() {
        assert!(check_hello("a", &hello(StandbyState::Standby), None).is_ok());
        assert!(
            check_hello(
                "a",
                &hello(StandbyState::Standby),
                Some(NodeStatus::Removed)
            )
            .is_ok()
        );
        assert!(
            check_hello(
                "a",
                &hello(StandbyState::Standby),
                Some(NodeStatus::Offline)
            )
            .is_ok()
        );
        let err = check_hello("a", &hello(StandbyState::Adopted), None).expect_err("adopted");
        assert!(err.starts_with("already a member"), "{err}");
        let err = check_hello("a", &hello(StandbyState::Standby), Some(NodeStatus::Idle))
            .expect_err("a live member");
        assert!(err.starts_with("already a member"), "{err}");
        let mut blank = hello(StandbyState::Standby);
        blank.challenge.clear();
        assert!(check_hello("a", &blank, None).is_err());
    }

    #[test]
    fn duplicates_by_address_or_node_id() {
        let a = AgentAddress {
            ip: "127.0.0.2".parse().expect("ip"),
            port: 9,
        };
        assert!(duplicate_agents(std::slice::from_ref(&a), ["n1"]).is_none());
        assert!(duplicate_agents(&[a.clone(), a.clone()], ["n1", "n2"]).is_some());
        let b = AgentAddress {
            port: 10,
            ..a.clone()
        };
        assert!(duplicate_agents(&[a, b], ["n1", "n1"]).is_some());
    }

    #[test]
    fn waits_end_when_nodes_are_empty_or_gone() {
        let running = still_running([
            ("a", NodeStatus::Draining, 1),
            ("b", NodeStatus::Drained, 0),
            ("c", NodeStatus::Offline, 2),
        ]);
        assert_eq!(running, vec!["a".to_string()]);
        let left = not_left([
            ("a", NodeStatus::Drained),
            ("b", NodeStatus::Offline),
            ("c", NodeStatus::Removed),
        ]);
        assert_eq!(left, vec!["a".to_string()]);
    }
}
