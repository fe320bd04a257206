//! Least connections: the backend with the fewest in-flight requests relative
//! to its weight (nginx's `least_conn`).
//!
//! Pools up to `exact_up_to` backends (default 64) are scanned whole, reading
//! the `in-flight` signal four backends per host call; it is prefetched, so
//! ids 0 to 3 come with the decision and a pool of up to four backends is
//! decided with no host call. Ties are broken by the host's shared
//! ticket, in proportion to weight, so an idle pool still rotates instead of
//! always favouring the first backend. Larger pools use the power of two
//! choices (as Envoy's least-request does): two random healthy backends are
//! compared, which keeps a decision O(1) however large the pool.

use fulcrum_plugin_sdk::{Backend, BackendId, Balancer, Plugin, Signal, random, shared};

/// Pools up to this size are scanned whole unless `exact_up_to` says otherwise.
pub const DEFAULT_EXACT_UP_TO: usize = 64;

/// A healthy backend as the policy keeps it.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub id: BackendId,
    pub weight: u64,
}

/// True when `a` carries fewer in-flight requests per unit of weight than `b`.
fn lighter(a_conns: u64, a: Peer, b_conns: u64, b: Peer) -> bool {
    a_conns * b.weight < b_conns * a.weight
}

/// Picks the least-loaded of `peers` given `conns` (indexed by backend id),
/// skipping `tried`; among equally loaded ones, the `ticket`'s turn by weight.
pub fn pick_exact(peers: &[(u32, u64)], conns: &[u32], tried: &[u32], ticket: impl FnOnce() -> u64) -> Option<u32> {
    let peers: Vec<Peer> = peers.iter().map(|&(id, weight)| Peer { id, weight }).collect();
    pick(&peers, conns, tried, ticket)
}

fn pick(peers: &[Peer], conns: &[u32], tried: &[BackendId], ticket: impl FnOnce() -> u64) -> Option<BackendId> {
    let load = |p: &Peer| u64::from(conns.get(p.id as usize).copied().unwrap_or(0));
    let mut best: Option<Peer> = None;
    let mut tied_weight = 0u64;
    for p in peers.iter().filter(|p| !tried.contains(&p.id)) {
        match best {
            Some(b) if lighter(load(&b), b, load(p), *p) => {}
            Some(b) if !lighter(load(p), *p, load(&b), b) => tied_weight += p.weight,
            _ => {
                best = Some(*p);
                tied_weight = p.weight;
            }
        }
    }
    let best = best?;
    if tied_weight == best.weight {
        return Some(best.id);
    }
    // Several backends share the lowest load: take turns among them by weight.
    let mut turn = ticket() % tied_weight;
    let tied = peers
        .iter()
        .filter(|p| !tried.contains(&p.id) && !lighter(load(&best), best, load(p), **p));
    for p in tied {
        if turn < p.weight {
            return Some(p.id);
        }
        turn -= p.weight;
    }
    Some(best.id)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Power of two choices among `peers` not yet tried: two drawn with `random`,
/// the lighter by `in_flight` wins. O(1) in the pool's size.
pub fn pick_two(
    peers: &[Peer],
    tried: &[BackendId],
    mut random: impl FnMut() -> u64,
    in_flight: impl Fn(BackendId) -> u32,
) -> Option<BackendId> {
    let usable = |p: &Peer| !tried.contains(&p.id);
    let mut draw = || {
        // A draw that hits a tried backend is drawn again; a scan ends the rare bad luck.
        (0..8)
            .map(|_| peers[(random() % peers.len() as u64) as usize])
            .find(usable)
            .or_else(|| peers.iter().copied().find(usable))
    };
    if peers.is_empty() {
        return None;
    }
    let a = draw()?;
    let b = draw()?;
    let (ca, cb) = (u64::from(in_flight(a.id)), u64::from(in_flight(b.id)));
    Some(if lighter(cb, b, ca, a) { b.id } else { a.id })
}

/// The policy's config: `{"exact_up_to": N}`.
#[derive(Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Pools up to this size are scanned whole; larger ones use two choices.
    pub exact_up_to: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            exact_up_to: DEFAULT_EXACT_UP_TO,
        }
    }
}

/// The policy: the healthy backends, and where the in-flight counts are read into.
pub struct LeastConn {
    healthy: Vec<Peer>,
    exact_up_to: usize,
    in_flight: Signal,
    /// In-flight counts by id, refilled per decision (no allocation per call).
    counts: Vec<u32>,
}

impl Plugin for LeastConn {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(LeastConn {
            healthy: Vec::new(),
            exact_up_to: config.exact_up_to,
            in_flight: Signal::resolve("in-flight")?.prefetch(),
            counts: Vec::new(),
        })
    }
}

impl LeastConn {
    fn decide(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        if self.healthy.len() > self.exact_up_to {
            let signal = self.in_flight;
            let load = |id| signal.read(id).unwrap_or(0);
            return pick_two(&self.healthy, tried, random::next, load);
        }
        let last = self.counts.len().checked_sub(1)? as u32;
        let counts = &mut self.counts;
        self.in_flight
            .for_each(last, |id, value| counts[id as usize] = value.unwrap_or(0));
        pick(&self.healthy, &self.counts, tried, || shared::next_ticket(0))
    }
}

impl Balancer for LeastConn {
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.healthy = backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| Peer {
                id: b.id,
                weight: u64::from(b.weight.max(1)),
            })
            .collect();
        // Weights come in hundredths: reduced, so that ties take turns one
        // request at a time rather than a hundred.
        let divisor = self.healthy.iter().fold(0, |g, p| gcd(g, p.weight)).max(1);
        self.healthy.iter_mut().for_each(|p| p.weight /= divisor);
        let ids = backends.iter().map(|b| b.id as usize + 1).max().unwrap_or(0);
        self.counts = vec![0; ids];
    }

    fn select(&mut self) -> Option<BackendId> {
        self.decide(&[])
    }

    fn reselect(&mut self, tried: &[BackendId]) -> Option<BackendId> {
        self.decide(tried)
    }
}

fulcrum_plugin_sdk::export_balancer!(LeastConn);

#[cfg(test)]
mod tests {
    use super::*;

    fn pick_exact(peers: &[(u32, u64)], conns: &[u32], tried: &[u32], ticket: impl FnOnce() -> u64) -> Option<u32> {
        let peers: Vec<Peer> = peers.iter().map(|&(id, weight)| Peer { id, weight }).collect();
        pick(&peers, conns, tried, ticket)
    }

    #[test]
    fn fewest_in_flight_wins() {
        assert_eq!(pick_exact(&[(0, 1), (1, 1), (2, 1)], &[3, 1, 2], &[], || 0), Some(1));
    }

    #[test]
    fn load_is_relative_to_weight() {
        // 4 on weight 4 is lighter than 2 on weight 1.
        assert_eq!(pick_exact(&[(0, 1), (1, 4)], &[2, 4], &[], || 0), Some(1));
    }

    #[test]
    fn ties_take_turns_by_ticket() {
        let peers = [(0, 1), (1, 1), (2, 1)];
        let picks: Vec<_> = (0..3).map(|t| pick_exact(&peers, &[0, 0, 0], &[], || t)).collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn two_choices_take_the_lighter_and_skip_tried() {
        let peers: Vec<Peer> = (0..100).map(|id| Peer { id, weight: 1 }).collect();
        let mut draws = [10u64, 20].into_iter().cycle();
        let load = |id: u32| if id == 20 { 0 } else { 7 };
        assert_eq!(pick_two(&peers, &[], || draws.next().unwrap_or(0), load), Some(20));
        let only = [Peer { id: 5, weight: 1 }, Peer { id: 6, weight: 1 }];
        assert_eq!(pick_two(&only, &[5], || 0, |_| 0), Some(6));
        assert_eq!(pick_two(&only, &[5, 6], || 0, |_| 0), None);
    }

    #[test]
    fn tried_backends_are_skipped() {
        assert_eq!(pick_exact(&[(0, 1), (1, 1)], &[0, 5], &[0], || 0), Some(1));
        assert_eq!(pick_exact(&[(0, 1)], &[0], &[0], || 0), None);
    }
}
