//! Queue positions under the round-robin across groups, for many jobs from one read.
//!
//! A job with k queued jobs ahead in its own group is leased after those k, and after up to
//! k jobs of every other group — k + 1 for groups whose turn comes before its own group's in
//! the current round (served longer ago, or as long ago with an older head) — which take
//! their turns in between. The SQLite backend's single-job query says the same in SQL.

use std::collections::HashMap;

/// One queued job, as read in group order and FIFO order within each group.
pub(crate) struct Queued {
    pub id: String,
    pub group: String,
    pub seq: i64,
    pub served: i64,
}

struct Group {
    /// Queued jobs of the group.
    len: u64,
    head: i64,
    served: i64,
}

/// The queue's shape: each group's size and turn, and where each job stands in its group.
pub(crate) struct Order {
    groups: Vec<Group>,
    /// Job id → (group index, jobs ahead of it in its group).
    jobs: HashMap<String, (usize, u64)>,
}

impl Order {
    /// `queued` must be sorted by group, then by `seq`.
    pub fn new(queued: Vec<Queued>) -> Order {
        let mut groups: Vec<Group> = Vec::new();
        let mut jobs = HashMap::with_capacity(queued.len());
        let mut current: Option<String> = None;
        for job in queued {
            if current.as_deref() != Some(job.group.as_str()) {
                groups.push(Group {
                    len: 0,
                    head: job.seq,
                    served: job.served,
                });
                current = Some(job.group);
            }
            let index = groups.len() - 1;
            let group = &mut groups[index];
            jobs.insert(job.id, (index, group.len));
            group.len += 1;
        }
        Order { groups, jobs }
    }

    /// Jobs that will be leased before `id`; `None` when it is not queued.
    pub fn position(&self, id: &str) -> Option<u64> {
        let &(mine, ahead) = self.jobs.get(id)?;
        let own = &self.groups[mine];
        let elsewhere: u64 = self
            .groups
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != mine)
            .map(|(_, other)| {
                let earlier_turn = other.served < own.served
                    || (other.served == own.served && other.head < own.head);
                other.len.min(ahead + u64::from(earlier_turn))
            })
            .sum();
        Some(ahead + elsewhere)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, group: &str, seq: i64, served: i64) -> Queued {
        Queued {
            id: id.into(),
            group: group.into(),
            seq,
            served,
        }
    }

    #[test]
    fn positions_follow_the_round_robin() {
        // a: a1 a2 a3 (served at 1), b: b1 (never served), c: c1 c2 (served at 2)
        let order = Order::new(vec![
            job("a1", "a", 1, 1),
            job("a2", "a", 4, 1),
            job("a3", "a", 5, 1),
            job("b1", "b", 2, 0),
            job("c1", "c", 3, 2),
            job("c2", "c", 6, 2),
        ]);
        // Lease order: b1 (served 0), a1 (1), c1 (2), then a2, c2, a3.
        assert_eq!(order.position("b1"), Some(0));
        assert_eq!(order.position("a1"), Some(1));
        assert_eq!(order.position("c1"), Some(2));
        assert_eq!(order.position("a2"), Some(3));
        assert_eq!(order.position("c2"), Some(4));
        assert_eq!(order.position("a3"), Some(5));
        assert_eq!(order.position("gone"), None);
    }
}
