//! Queue positions under the two-level round-robin, from the counters of the waiting shares
//! and groups: the cost grows with the number of shares waiting, not with the queue.
//!
//! A job with k queued jobs ahead in its own group is leased after those k, after up to k
//! jobs of every other group of its share — k + 1 for groups whose turn comes first (an older
//! stamp) — and, with a its share's jobs leased before it that way, after up to a jobs of
//! every other share (a + 1 for shares whose turn comes first).

use crate::fairness::Turn;

/// Jobs leased before a job with `ahead` jobs before it in its group `group` of share
/// `share`, given the waiting `groups` of that share and every waiting share.
pub(crate) fn position(
    ahead: u64,
    group: &str,
    groups: &[Turn],
    share: &str,
    shares: &[Turn],
) -> u64 {
    let in_share = ahead + turns_before(ahead, group, groups);
    in_share + turns_before(in_share, share, shares)
}

/// Turns the others of `turns` take before `mine` has taken `taken` more.
fn turns_before(taken: u64, mine: &str, turns: &[Turn]) -> u64 {
    let stamp = turns
        .iter()
        .find(|t| t.name == mine)
        .map(|t| t.stamp)
        .unwrap_or(i64::MAX);
    turns
        .iter()
        .filter(|t| t.name != mine)
        .map(|t| t.queued.min(taken + u64::from(t.stamp < stamp)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(name: &str, queued: u64, stamp: i64) -> Turn {
        Turn {
            name: name.into(),
            queued,
            stamp,
        }
    }

    #[test]
    fn positions_follow_both_round_robins() {
        // Shares: a (3 queued, stamp 1), b (1, stamp 2), c (2, stamp 3). Lease order:
        // a b c a c a.
        let shares = [turn("a", 3, 1), turn("b", 1, 2), turn("c", 2, 3)];
        let one_group = |name: &str, queued| vec![turn(name, queued, 0)];
        let at = |share: &str, ahead| {
            let groups = one_group(
                share,
                shares
                    .iter()
                    .find(|s| s.name == share)
                    .expect("a share")
                    .queued,
            );
            position(ahead, share, &groups, share, &shares)
        };
        assert_eq!([at("a", 0), at("b", 0), at("c", 0)], [0, 1, 2]);
        assert_eq!([at("a", 1), at("c", 1), at("a", 2)], [3, 4, 5]);

        // Inside share a: groups u (2 queued, stamp 5) and v (1, stamp 4) — v goes first.
        let groups = [turn("u", 2, 5), turn("v", 1, 4)];
        assert_eq!(position(0, "v", &groups, "a", &shares), 0);
        // u's first job is a's second turn: after b and c have had theirs.
        assert_eq!(position(0, "u", &groups, "a", &shares), 3);
        assert_eq!(position(1, "u", &groups, "a", &shares), 5);
    }
}
