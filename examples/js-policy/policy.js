// Weighted round robin, in JavaScript: each healthy backend takes turns in
// proportion to its weight, the turn taken from the host's shared ticket so
// that every worker's instance agrees on whose turn it is.
//
// policy_config: {} (none).
// Built by examples/build.sh into a fulcrum:plugin@0.2.0 balancer.

import { nextTicket } from 'fulcrum:plugin/shared@0.2.0';

// One period of turns: each backend id as many times as its share of weight.
let schedule = [];

function gcd(a, b) {
  return b === 0 ? a : gcd(b, a % b);
}

export const lifecycle = {
  init(config) {
    const settings = JSON.parse(config || '{}');
    const keys = Object.keys(settings);
    if (keys.length > 0) {
      throw `bad config: unknown key '${keys[0]}' (this policy takes none)`;
    }
  },
};

export const policy = {
  setBackends(backends) {
    const healthy = backends.filter((b) => b.healthy);
    const divisor = healthy.reduce((g, b) => gcd(g, Math.max(b.weight, 1)), 0) || 1;
    const turns = [];
    // Interleaved: round r gives a turn to every backend with more than r shares.
    const shares = healthy.map((b) => Math.max(b.weight, 1) / divisor);
    const most = Math.max(0, ...shares);
    for (let round = 0; round < most; round++) {
      healthy.forEach((b, i) => {
        if (shares[i] > round) turns.push(b.id);
      });
    }
    schedule = turns;
  },

  // `hint` (a batch of the prefetched signal) goes unused: this policy reads
  // no signal and prefetches none.
  select(_hint) {
    if (schedule.length === 0) return undefined;
    return schedule[Number(nextTicket(0) % BigInt(schedule.length))];
  },

  reselect(tried, _hint) {
    const n = schedule.length;
    const start = Number(nextTicket(0) % BigInt(Math.max(n, 1)));
    for (let step = 0; step < n; step++) {
      const id = schedule[(start + step) % n];
      if (!tried.includes(id)) return id;
    }
    return undefined;
  },
};
