//! Max-min fair sharing of one link direction between flows that each have their own cap
//! (the receiver's downlink share, the rate its requests in flight allow over the hop's
//! latency). Water-filling: flows capped below the equal share keep their cap, the rest
//! split what is left equally.

/// Rates for flows with `caps` sharing `capacity`. Never more than a flow's cap; the sum
/// never exceeds `capacity`; a flow gets less than its cap only if every such flow gets the
/// same, largest possible, share.
pub fn waterfill(capacity: f64, caps: &[f64]) -> Vec<f64> {
    let n = caps.len();
    let mut rates = vec![0.0; n];
    if n == 0 || capacity <= 0.0 {
        return rates;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| caps[a].total_cmp(&caps[b]));
    let mut left = capacity;
    for (pos, &i) in order.iter().enumerate() {
        let share = left / (n - pos) as f64;
        let r = caps[i].max(0.0).min(share);
        rates[i] = r;
        left -= r;
    }
    rates
}

/// Max-min fair rates on a general network by progressive filling: `flows[f]` lists the
/// resources flow `f` crosses, `capacity[r]` each resource's capacity. Used to check the
/// simulator's per-sender water-filling against the exact allocation.
pub fn max_min(capacity: &[f64], flows: &[Vec<usize>]) -> Vec<f64> {
    let mut rate = vec![0.0; flows.len()];
    let mut frozen = vec![false; flows.len()];
    let mut left = capacity.to_vec();
    loop {
        let mut users = vec![0usize; capacity.len()];
        for (f, res) in flows.iter().enumerate() {
            if !frozen[f] {
                for &r in res {
                    users[r] += 1;
                }
            }
        }
        // The tightest resource sets the next increment of every unfrozen flow.
        let inc = (0..capacity.len()).filter(|&r| users[r] > 0).map(|r| left[r] / users[r] as f64).fold(f64::INFINITY, f64::min);
        if !inc.is_finite() {
            return rate;
        }
        for (f, res) in flows.iter().enumerate() {
            if !frozen[f] {
                rate[f] += inc;
                for &r in res {
                    left[r] -= inc;
                }
            }
        }
        for (f, res) in flows.iter().enumerate() {
            if !frozen[f] && res.iter().any(|&r| left[r] <= 1e-9 * capacity[r].max(1.0)) {
                frozen[f] = true;
            }
        }
    }
}
