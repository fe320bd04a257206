//! Least connections: the backend with the fewest in-flight requests relative
//! to its weight (nginx's `least_conn`).
//!
//! Pools up to `exact_up_to` backends (default 64) are scanned whole, reading
//! the in-flight counts four at a time (pools up to 8) or as one list. Ties are broken by the host's shared
//! ticket, in proportion to weight, so an idle pool still rotates instead of
//! always favouring the first backend. Larger pools use the power of two
//! choices (as Envoy's least-request does): two random healthy backends are
//! compared, which keeps a decision O(1) however large the pool.

/// A backend's id, as the WIT `backend-id`.
pub type BackendId = u32;

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

/// The component glue: only built for Wasm, so the logic above tests on the host.
#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

    use super::{DEFAULT_EXACT_UP_TO, Peer, pick, pick_two};
    use exports::fulcrum::plugin::policy::{Backend, BackendId, Guest};
    use fulcrum::plugin::host;
    use std::cell::{Cell, RefCell};

    thread_local! {
        static HEALTHY: RefCell<Vec<Peer>> = const { RefCell::new(Vec::new()) };
        static EXACT_UP_TO: Cell<usize> = const { Cell::new(DEFAULT_EXACT_UP_TO) };
        static RNG: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) };
        static BACKENDS: Cell<usize> = const { Cell::new(0) };
    }

    /// Every backend's in-flight count, indexed by id, read the cheapest way
    /// for the pool's size: four per host call into a stack buffer for small
    /// pools (no allocation on either side), one list otherwise.
    fn with_in_flight_counts<R>(backends: usize, f: impl FnOnce(&[u32]) -> R) -> R {
        if backends > 8 {
            return f(&host::in_flight_all());
        }
        let mut counts = [0u32; 8];
        for first in (0..backends).step_by(4) {
            let (a, b, c, d) = host::in_flight_four(first as u32);
            counts[first..first + 4].copy_from_slice(&[a, b, c, d]);
        }
        f(&counts[..backends])
    }

    fn backend_count() -> usize {
        BACKENDS.with(Cell::get)
    }

    fn next_random() -> u64 {
        RNG.with(|r| {
            let mut x = r.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.set(x);
            x
        })
    }

    fn decide(tried: &[BackendId]) -> Option<BackendId> {
        HEALTHY.with(|h| {
            let peers = h.borrow();
            if peers.len() > EXACT_UP_TO.with(Cell::get) {
                return pick_two(&peers, tried, next_random, host::in_flight);
            }
            with_in_flight_counts(backend_count(), |conns| {
                pick(&peers, conns, tried, || host::next_ticket(0))
            })
        })
    }

    struct LeastConn;

    impl Guest for LeastConn {
        fn init(config: String) -> Result<(), String> {
            // The config is a flat JSON object; the one key read is `exact_up_to`.
            if let Some(rest) = config.split("\"exact_up_to\"").nth(1) {
                let digits: String = rest
                    .trim_start_matches([' ', ':'])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                let limit = digits
                    .parse()
                    .map_err(|_| format!("exact_up_to must be a whole number, got {}", rest.trim()))?;
                EXACT_UP_TO.with(|c| c.set(limit));
            }
            RNG.with(|r| r.set(host::next_ticket(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1));
            Ok(())
        }

        fn set_backends(backends: Vec<Backend>) {
            let healthy = backends
                .iter()
                .filter(|b| b.healthy)
                .map(|b| Peer {
                    id: b.id,
                    weight: u64::from(b.weight.max(1)),
                })
                .collect();
            HEALTHY.with(|h| *h.borrow_mut() = healthy);
            BACKENDS.with(|n| n.set(backends.len()));
        }

        fn select() -> Option<BackendId> {
            decide(&[])
        }

        fn reselect(tried: Vec<BackendId>) -> Option<BackendId> {
            decide(&tried)
        }
    }

    export!(LeastConn);
}

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
