//! Anomaly detection over per-peer traffic samples: which peers of the mesh stand out.
//!
//! Every tick the node hands [`AnomalyDetector::observe`] one [`PeerSample`] per connected peer:
//! the bytes per second received from it, its TCP retransmits per second and the cumulative count
//! of its contributions this node rejected. Three kinds of anomaly are looked for:
//!
//! - [`AnomalyKind::TrafficOutlier`] and [`AnomalyKind::RetransmitOutlier`]: a peer whose rate is
//!   far above the rest of the mesh, by a robust (modified) z-score over the peers of the tick:
//!   `z = 0.6745 · (x − median) / MAD`, with MAD the median absolute deviation. Only high values
//!   count (a quiet peer is not an attack). The score needs at least
//!   [`AnomalyConfig::min_peers`] peers in the tick and a rate of at least
//!   [`MetricThresholds::min_value`], so an idle or tiny mesh flags nothing. The MAD is floored
//!   ([`MetricThresholds::min_mad`], [`MetricThresholds::min_relative_mad`] of the median) so
//!   peers that agree almost exactly do not turn a small difference into a huge score; when it is
//!   still zero, the mean absolute deviation stands in (`z = (x − median) / (1.2533 · MeanAD)`),
//!   and when that is zero too every peer has the same value and nothing stands out.
//! - [`AnomalyKind::RepeatedRejections`]: at least [`AnomalyConfig::rejection_threshold`]
//!   rejected contributions within [`AnomalyConfig::rejection_window_ms`].
//!
//! Flags have hysteresis: a (peer, kind) is flagged after [`AnomalyConfig::flag_after`]
//! consecutive anomalous ticks and cleared after [`AnomalyConfig::clear_after`] consecutive clean
//! ones, so a single burst neither flags nor unflags a peer. Each change comes out once as an
//! [`AnomalyEvent`]. The peer table is bounded ([`AnomalyConfig::max_peers`]) and peers not seen
//! for [`AnomalyConfig::forget_after_ms`] are forgotten (their flags cleared).
//!
//! Pure: no I/O, no clock (`now_ms` comes in), no randomness; the result does not depend on the
//! order of the samples.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Constant of the modified z-score: `Φ⁻¹(0.75)`, which makes MAD/0.6745 estimate σ for normal
/// data.
pub const MAD_Z_FACTOR: f64 = 0.6745;
/// Constant of the mean-absolute-deviation fallback: `√(π/2)`, which makes 1.2533·MeanAD estimate
/// σ for normal data.
pub const MEAN_AD_FACTOR: f64 = 1.253_314;
/// Most rejection records kept per peer (older ones are merged into the oldest kept one).
const MAX_REJECTION_MARKS: usize = 64;

/// Thresholds of one metric (received bytes per second, or retransmits per second).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricThresholds {
    /// A peer below this value is never an outlier of this metric, whatever its score: the noise
    /// gate for idle meshes.
    pub min_value: f64,
    /// Smallest MAD used (in the metric's unit): the spread assumed when peers agree exactly.
    pub min_mad: f64,
    /// Smallest MAD used, as a fraction of the median's magnitude (so a peer must be well above
    /// the median, not just above a very tight cluster).
    pub min_relative_mad: f64,
}

/// Configuration of an [`AnomalyDetector`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyConfig {
    /// Modified z-score at or above which a value is an outlier (3.5, after Iglewicz & Hoaglin).
    pub z_threshold: f64,
    /// Fewest peers in a tick for outliers to be looked for at all.
    pub min_peers: usize,
    /// Thresholds of the received-bytes-per-second metric.
    pub traffic: MetricThresholds,
    /// Thresholds of the retransmits-per-second metric.
    pub retransmits: MetricThresholds,
    /// Rejected contributions within the window that make a peer anomalous.
    pub rejection_threshold: u64,
    /// Window over which rejections are counted, in milliseconds.
    pub rejection_window_ms: u64,
    /// Consecutive anomalous ticks before a (peer, kind) is flagged (at least 1).
    pub flag_after: u32,
    /// Consecutive clean ticks before a flag is cleared (at least 1).
    pub clear_after: u32,
    /// Most peers tracked at once.
    pub max_peers: usize,
    /// A peer absent from the samples for this long is forgotten and its flags cleared.
    pub forget_after_ms: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            z_threshold: 3.5,
            min_peers: 4,
            traffic: MetricThresholds {
                min_value: 256.0 * 1024.0,
                min_mad: 16.0 * 1024.0,
                min_relative_mad: 0.05,
            },
            retransmits: MetricThresholds {
                min_value: 5.0,
                min_mad: 0.5,
                min_relative_mad: 0.05,
            },
            rejection_threshold: 3,
            rejection_window_ms: 10 * 60 * 1000,
            flag_after: 3,
            clear_after: 3,
            max_peers: 4096,
            forget_after_ms: 5 * 60 * 1000,
        }
    }
}

/// One peer's traffic in one tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerSample<P> {
    /// The peer.
    pub peer: P,
    /// Bytes per second received from the peer over the last tick.
    pub rx_bytes_per_s: f64,
    /// TCP retransmits per second towards the peer over the last tick.
    pub retransmits_per_s: f64,
    /// Contributions of the peer rejected so far (cumulative; a decrease is taken as a counter
    /// restart).
    pub rejections: u64,
}

/// The kinds of anomaly, without their measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// Received traffic far above the mesh's.
    TrafficOutlier,
    /// TCP retransmits far above the mesh's.
    RetransmitOutlier,
    /// Many rejected contributions within the window.
    RepeatedRejections,
}

impl AnomalyKind {
    /// All kinds, in order.
    pub const ALL: [AnomalyKind; 3] = [
        AnomalyKind::TrafficOutlier,
        AnomalyKind::RetransmitOutlier,
        AnomalyKind::RepeatedRejections,
    ];

    /// Stable snake-case name (`traffic_outlier`, `retransmit_outlier`, `repeated_rejections`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TrafficOutlier => "traffic_outlier",
            Self::RetransmitOutlier => "retransmit_outlier",
            Self::RepeatedRejections => "repeated_rejections",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::TrafficOutlier => 0,
            Self::RetransmitOutlier => 1,
            Self::RepeatedRejections => 2,
        }
    }
}

impl std::fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An anomaly with the measurement of the latest anomalous tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyFlag {
    /// Received traffic far above the mesh's.
    TrafficOutlier {
        /// Modified z-score.
        z: f64,
        /// The peer's bytes per second.
        value: f64,
        /// The median bytes per second of the tick's peers.
        median: f64,
    },
    /// TCP retransmits far above the mesh's.
    RetransmitOutlier {
        /// Modified z-score.
        z: f64,
        /// The peer's retransmits per second.
        value: f64,
        /// The median retransmits per second of the tick's peers.
        median: f64,
    },
    /// Many rejected contributions within the window.
    RepeatedRejections {
        /// Rejections within the window.
        count: u64,
    },
}

impl AnomalyFlag {
    /// The flag's kind.
    pub fn kind(&self) -> AnomalyKind {
        match self {
            Self::TrafficOutlier { .. } => AnomalyKind::TrafficOutlier,
            Self::RetransmitOutlier { .. } => AnomalyKind::RetransmitOutlier,
            Self::RepeatedRejections { .. } => AnomalyKind::RepeatedRejections,
        }
    }

    /// One line describing the measurement, e.g. `z=12.3 (5242880/s, median 1024/s)`.
    pub fn detail(&self) -> String {
        match self {
            Self::TrafficOutlier { z, value, median } => {
                format!("z={z:.1} ({value:.0} B/s received, mesh median {median:.0} B/s)")
            }
            Self::RetransmitOutlier { z, value, median } => {
                format!("z={z:.1} ({value:.1} retransmits/s, mesh median {median:.1}/s)")
            }
            Self::RepeatedRejections { count } => {
                format!("{count} rejected contributions within the window")
            }
        }
    }
}

/// A change of a peer's flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AnomalyEvent<P> {
    /// The peer is now flagged with this anomaly.
    Flagged {
        /// The peer.
        peer: P,
        /// The anomaly and its measurement.
        flag: AnomalyFlag,
    },
    /// The peer's flag of this kind was lifted (clean ticks, or the peer was forgotten).
    Cleared {
        /// The peer.
        peer: P,
        /// The kind that was cleared.
        kind: AnomalyKind,
    },
}

/// Hysteresis state of one (peer, kind).
#[derive(Debug, Clone, Default)]
struct KindState {
    anomalous_streak: u32,
    clean_streak: u32,
    flag: Option<AnomalyFlag>,
}

#[derive(Debug, Clone)]
struct PeerState {
    last_seen_ms: u64,
    last_rejections: u64,
    /// (time, rejections that arrived then), oldest first, only non-zero increments.
    rejection_marks: VecDeque<(u64, u64)>,
    kinds: [KindState; 3],
}

impl PeerState {
    fn new(now_ms: u64) -> Self {
        Self {
            last_seen_ms: now_ms,
            last_rejections: 0,
            rejection_marks: VecDeque::new(),
            kinds: Default::default(),
        }
    }

    fn is_flagged(&self) -> bool {
        self.kinds.iter().any(|k| k.flag.is_some())
    }

    /// Records the cumulative count and returns the rejections within the window.
    fn rejections_in_window(&mut self, cumulative: u64, now_ms: u64, window_ms: u64) -> u64 {
        let delta = if cumulative >= self.last_rejections {
            cumulative - self.last_rejections
        } else {
            // The counter restarted: everything it holds is new.
            cumulative
        };
        self.last_rejections = cumulative;
        if delta > 0 {
            if self.rejection_marks.len() >= MAX_REJECTION_MARKS
                && let Some((_, oldest)) = self.rejection_marks.pop_front()
                && let Some(next) = self.rejection_marks.front_mut()
            {
                next.1 = next.1.saturating_add(oldest);
            }
            self.rejection_marks.push_back((now_ms, delta));
        }
        let start = now_ms.saturating_sub(window_ms);
        while self
            .rejection_marks
            .front()
            .is_some_and(|&(t, _)| t < start || t > now_ms)
        {
            self.rejection_marks.pop_front();
        }
        self.rejection_marks
            .iter()
            .fold(0u64, |acc, &(_, n)| acc.saturating_add(n))
    }
}

/// Flags peers whose traffic, retransmits or rejections stand out; see the module documentation.
#[derive(Debug, Clone)]
pub struct AnomalyDetector<P: Ord + Clone> {
    config: AnomalyConfig,
    peers: BTreeMap<P, PeerState>,
}

impl<P: Ord + Clone> AnomalyDetector<P> {
    /// A detector with `config` (`flag_after`, `clear_after` and `max_peers` are raised to at
    /// least 1, `min_peers` to at least 3, non-finite or negative thresholds replaced by the
    /// defaults).
    pub fn new(config: AnomalyConfig) -> Self {
        Self {
            config: sanitize_config(config),
            peers: BTreeMap::new(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }

    /// Number of peers tracked.
    pub fn tracked_peers(&self) -> usize {
        self.peers.len()
    }

    /// Feeds one tick: one sample per connected peer (a repeated peer's later samples are
    /// ignored; non-finite or negative rates count as zero). Returns the flags raised and lifted
    /// by this tick, cleared ones first, in peer order.
    pub fn observe(&mut self, now_ms: u64, samples: &[PeerSample<P>]) -> Vec<AnomalyEvent<P>> {
        let mut events = Vec::new();
        self.forget_stale(now_ms, &mut events);

        // Deduplicate (first sample of a peer wins) and sanitize.
        let mut tick: BTreeMap<&P, (f64, f64, u64)> = BTreeMap::new();
        for s in samples {
            tick.entry(&s.peer).or_insert((
                sane(s.rx_bytes_per_s),
                sane(s.retransmits_per_s),
                s.rejections,
            ));
        }

        let enough = tick.len() >= self.config.min_peers;
        let traffic: Vec<f64> = tick.values().map(|v| v.0).collect();
        let retrans: Vec<f64> = tick.values().map(|v| v.1).collect();
        let traffic_scores = enough.then(|| Scores::new(&traffic, &self.config.traffic));
        let retrans_scores = enough.then(|| Scores::new(&retrans, &self.config.retransmits));

        // Peers of this tick are not eviction candidates while new ones are added.
        for peer in tick.keys() {
            if let Some(state) = self.peers.get_mut(*peer) {
                state.last_seen_ms = now_ms;
            }
        }
        let config = self.config.clone();
        let mut raised = Vec::new();
        let mut lifted = Vec::new();
        for (peer, &(rx, rt, rejections)) in &tick {
            let Some(state) = self.state_for(peer, now_ms, &mut lifted) else {
                continue;
            };
            state.last_seen_ms = now_ms;
            let count = state.rejections_in_window(rejections, now_ms, config.rejection_window_ms);
            let verdicts = [
                traffic_scores
                    .as_ref()
                    .and_then(|s| s.outlier(rx, &config.traffic, config.z_threshold))
                    .map(|(z, median)| AnomalyFlag::TrafficOutlier {
                        z,
                        value: rx,
                        median,
                    }),
                retrans_scores
                    .as_ref()
                    .and_then(|s| s.outlier(rt, &config.retransmits, config.z_threshold))
                    .map(|(z, median)| AnomalyFlag::RetransmitOutlier {
                        z,
                        value: rt,
                        median,
                    }),
                (count >= config.rejection_threshold)
                    .then_some(AnomalyFlag::RepeatedRejections { count }),
            ];
            for (kind, verdict) in AnomalyKind::ALL.into_iter().zip(verdicts) {
                let k = &mut state.kinds[kind.index()];
                match verdict {
                    Some(flag) => {
                        k.clean_streak = 0;
                        k.anomalous_streak = k.anomalous_streak.saturating_add(1);
                        if k.flag.is_some() {
                            k.flag = Some(flag);
                        } else if k.anomalous_streak >= config.flag_after {
                            k.flag = Some(flag.clone());
                            raised.push(AnomalyEvent::Flagged {
                                peer: (*peer).clone(),
                                flag,
                            });
                        }
                    }
                    None => {
                        k.anomalous_streak = 0;
                        k.clean_streak = k.clean_streak.saturating_add(1);
                        if k.flag.is_some() && k.clean_streak >= config.clear_after {
                            k.flag = None;
                            lifted.push(AnomalyEvent::Cleared {
                                peer: (*peer).clone(),
                                kind,
                            });
                        }
                    }
                }
            }
        }
        events.extend(lifted);
        events.extend(raised);
        events
    }

    /// Every flag currently raised, by peer then kind.
    pub fn flags(&self) -> Vec<(P, AnomalyFlag)> {
        self.peers
            .iter()
            .flat_map(|(p, s)| {
                s.kinds
                    .iter()
                    .filter_map(move |k| k.flag.clone().map(|f| (p.clone(), f)))
            })
            .collect()
    }

    /// Whether `peer` currently has any flag.
    pub fn is_flagged(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(PeerState::is_flagged)
    }

    /// Forgets `peer` (for instance after it was banned), without an event.
    pub fn forget(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    fn forget_stale(&mut self, now_ms: u64, events: &mut Vec<AnomalyEvent<P>>) {
        let forget_after = self.config.forget_after_ms;
        let stale: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.last_seen_ms) > forget_after)
            .map(|(p, _)| p.clone())
            .collect();
        for p in stale {
            if let Some(state) = self.peers.remove(&p) {
                push_cleared(&p, &state, events);
            }
        }
    }

    /// The state of `peer`, created if there is room (evicting the least recently seen unflagged
    /// peer that is not in this tick when the table is full); `None` if the table is full of
    /// peers that cannot be evicted.
    fn state_for(
        &mut self,
        peer: &P,
        now_ms: u64,
        events: &mut Vec<AnomalyEvent<P>>,
    ) -> Option<&mut PeerState> {
        if !self.peers.contains_key(peer) {
            if self.peers.len() >= self.config.max_peers {
                let victim = self
                    .peers
                    .iter()
                    .filter(|(_, s)| s.last_seen_ms < now_ms && !s.is_flagged())
                    .min_by_key(|(_, s)| s.last_seen_ms)
                    .map(|(p, _)| p.clone())?;
                if let Some(state) = self.peers.remove(&victim) {
                    push_cleared(&victim, &state, events);
                }
            }
            self.peers.insert(peer.clone(), PeerState::new(now_ms));
        }
        self.peers.get_mut(peer)
    }
}

fn push_cleared<P: Clone>(peer: &P, state: &PeerState, events: &mut Vec<AnomalyEvent<P>>) {
    for kind in AnomalyKind::ALL {
        if state.kinds[kind.index()].flag.is_some() {
            events.push(AnomalyEvent::Cleared {
                peer: peer.clone(),
                kind,
            });
        }
    }
}

fn sane(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

fn sanitize_config(mut c: AnomalyConfig) -> AnomalyConfig {
    let d = AnomalyConfig::default();
    let fix = |x: f64, default: f64| {
        if x.is_finite() && x >= 0.0 {
            x
        } else {
            default
        }
    };
    c.z_threshold = if c.z_threshold.is_finite() && c.z_threshold > 0.0 {
        c.z_threshold
    } else {
        d.z_threshold
    };
    for (m, dm) in [
        (&mut c.traffic, d.traffic),
        (&mut c.retransmits, d.retransmits),
    ] {
        m.min_value = fix(m.min_value, dm.min_value);
        m.min_mad = fix(m.min_mad, dm.min_mad);
        m.min_relative_mad = fix(m.min_relative_mad, dm.min_relative_mad);
    }
    c.min_peers = c.min_peers.max(3);
    c.flag_after = c.flag_after.max(1);
    c.clear_after = c.clear_after.max(1);
    c.max_peers = c.max_peers.max(1);
    c
}

/// Median of a slice (sorted in place); `None` when empty.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Location and scale of one metric over one tick.
#[derive(Debug, Clone, Copy)]
struct Scores {
    median: f64,
    /// σ estimate: MAD/0.6745 (floored), or 1.2533·MeanAD; 0 when every value is the same.
    sigma: f64,
}

impl Scores {
    fn new(values: &[f64], t: &MetricThresholds) -> Self {
        let mut v = values.to_vec();
        let med = median(&mut v).unwrap_or(0.0);
        let mut dev: Vec<f64> = values.iter().map(|x| (x - med).abs()).collect();
        let mad = median(&mut dev)
            .unwrap_or(0.0)
            .max(t.min_mad)
            .max(t.min_relative_mad * med.abs());
        let sigma = if mad > 0.0 {
            mad / MAD_Z_FACTOR
        } else {
            let n = dev.len().max(1) as f64;
            MEAN_AD_FACTOR * dev.iter().sum::<f64>() / n
        };
        Self { median: med, sigma }
    }

    /// `Some((z, median))` when `x` is a high outlier.
    fn outlier(&self, x: f64, t: &MetricThresholds, threshold: f64) -> Option<(f64, f64)> {
        if x < t.min_value || x <= self.median || self.sigma <= 0.0 {
            return None;
        }
        let z = (x - self.median) / self.sigma;
        (z.is_finite() && z >= threshold).then_some((z, self.median))
    }
}

/// Modified z-scores of `values` (`0.6745 · (x − median) / MAD`, the MAD floored as `t` says,
/// falling back to the mean absolute deviation when the MAD is zero); all zero when every value
/// is the same. Signed: values below the median score negative.
pub fn robust_z_scores(values: &[f64], t: &MetricThresholds) -> Vec<f64> {
    let clean: Vec<f64> = values.iter().map(|&x| sane(x)).collect();
    let s = Scores::new(&clean, t);
    clean
        .iter()
        .map(|&x| {
            if s.sigma > 0.0 {
                (x - s.median) / s.sigma
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1024.0 * 1024.0;

    fn sample(peer: u32, rx: f64, rt: f64, rejections: u64) -> PeerSample<u32> {
        PeerSample {
            peer,
            rx_bytes_per_s: rx,
            retransmits_per_s: rt,
            rejections,
        }
    }

    /// `n` peers at about 1 MB/s (a little spread) plus whatever `extra` says.
    fn mesh(n: u32, extra: &[PeerSample<u32>]) -> Vec<PeerSample<u32>> {
        let mut v: Vec<_> = (0..n)
            .map(|i| sample(i, MB + f64::from(i) * 20_000.0, 0.2, 0))
            .collect();
        v.extend_from_slice(extra);
        v
    }

    fn flagged_kinds(d: &AnomalyDetector<u32>, peer: u32) -> Vec<AnomalyKind> {
        d.flags()
            .into_iter()
            .filter(|(p, _)| *p == peer)
            .map(|(_, f)| f.kind())
            .collect()
    }

    #[test]
    fn a_flood_peer_is_flagged_after_k_ticks_and_cleared_after_k_clean_ones() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        let k = d.config().flag_after;
        let flood = sample(99, 50.0 * MB, 0.2, 0);
        for tick in 1..k {
            let ev = d.observe(
                u64::from(tick) * 1000,
                &mesh(6, std::slice::from_ref(&flood)),
            );
            assert!(ev.is_empty(), "tick {tick}: {ev:?}");
            assert!(d.flags().is_empty());
        }
        let ev = d.observe(u64::from(k) * 1000, &mesh(6, std::slice::from_ref(&flood)));
        assert_eq!(ev.len(), 1, "{ev:?}");
        match &ev[0] {
            AnomalyEvent::Flagged {
                peer: 99,
                flag: AnomalyFlag::TrafficOutlier { z, value, median },
            } => {
                assert!(*z >= 3.5, "z={z}");
                assert_eq!(*value, 50.0 * MB);
                assert!(*median > MB && *median < 1.2 * MB, "median={median}");
            }
            other => panic!("unexpected event {other:?}"),
        }
        assert_eq!(flagged_kinds(&d, 99), vec![AnomalyKind::TrafficOutlier]);
        // Nobody else is flagged.
        assert_eq!(d.flags().len(), 1);

        // Still flooding: no new event; then it calms down.
        let mut now = u64::from(k) * 1000;
        now += 1000;
        assert!(d.observe(now, &mesh(6, &[flood])).is_empty());
        let calm = sample(99, MB, 0.2, 0);
        let clear = d.config().clear_after;
        for _ in 1..clear {
            now += 1000;
            assert!(
                d.observe(now, &mesh(6, std::slice::from_ref(&calm)))
                    .is_empty()
            );
            assert_eq!(flagged_kinds(&d, 99), vec![AnomalyKind::TrafficOutlier]);
        }
        now += 1000;
        let ev = d.observe(now, &mesh(6, &[calm]));
        assert_eq!(
            ev,
            vec![AnomalyEvent::Cleared {
                peer: 99,
                kind: AnomalyKind::TrafficOutlier
            }]
        );
        assert!(d.flags().is_empty());
    }

    #[test]
    fn a_single_burst_does_not_flag() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        let mut now = 0;
        for burst in [true, false, true, false, true, false] {
            now += 1000;
            let rx = if burst { 50.0 * MB } else { MB };
            assert!(
                d.observe(now, &mesh(6, &[sample(99, rx, 0.0, 0)]))
                    .is_empty()
            );
        }
        assert!(d.flags().is_empty());
    }

    #[test]
    fn an_idle_mesh_flags_nothing() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        for tick in 1..=20u64 {
            // Idle peers: a few hundred bytes of keep-alives, one peer ten times the others
            // (a huge z-score), but far below the noise gate.
            let mut samples: Vec<_> = (0..8).map(|i| sample(i, 200.0, 0.0, 0)).collect();
            samples.push(sample(8, 2000.0, 0.0, 0));
            assert!(d.observe(tick * 1000, &samples).is_empty());
        }
        assert!(d.flags().is_empty());
        let z = robust_z_scores(
            &[200.0, 200.0, 200.0, 200.0, 2000.0],
            &MetricThresholds {
                min_value: 0.0,
                min_mad: 0.0,
                min_relative_mad: 0.0,
            },
        );
        assert!(z[4] > 3.5, "the gate, not the score, keeps it quiet: {z:?}");
    }

    #[test]
    fn too_few_peers_flag_nothing() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default());
        for tick in 1..=10u64 {
            let samples = [
                sample(0, MB, 0.0, 0),
                sample(1, MB, 0.0, 0),
                sample(2, 100.0 * MB, 500.0, 0),
            ];
            assert!(d.observe(tick * 1000, &samples).is_empty());
        }
        assert!(d.flags().is_empty());
    }

    #[test]
    fn repeated_rejections_flag_even_in_a_small_mesh_and_expire() {
        let config = AnomalyConfig {
            rejection_threshold: 3,
            rejection_window_ms: 60_000,
            flag_after: 2,
            clear_after: 2,
            ..AnomalyConfig::default()
        };
        let mut d = AnomalyDetector::new(config);
        // Two rejections: below the threshold.
        assert!(d.observe(1000, &[sample(7, MB, 0.0, 2)]).is_empty());
        assert!(d.observe(2000, &[sample(7, MB, 0.0, 2)]).is_empty());
        // A third: anomalous, flagged on the second anomalous tick.
        assert!(d.observe(3000, &[sample(7, MB, 0.0, 3)]).is_empty());
        let ev = d.observe(4000, &[sample(7, MB, 0.0, 3)]);
        assert_eq!(
            ev,
            vec![AnomalyEvent::Flagged {
                peer: 7,
                flag: AnomalyFlag::RepeatedRejections { count: 3 }
            }]
        );
        // More rejections update the count without a new event.
        assert!(d.observe(5000, &[sample(7, MB, 0.0, 5)]).is_empty());
        assert_eq!(
            d.flags(),
            vec![(7, AnomalyFlag::RepeatedRejections { count: 5 })]
        );
        // The window slides past them: cleared after two clean ticks.
        assert!(d.observe(63_500, &[sample(7, MB, 0.0, 5)]).is_empty());
        let ev = d.observe(64_500, &[sample(7, MB, 0.0, 5)]);
        assert_eq!(
            ev,
            vec![AnomalyEvent::Cleared {
                peer: 7,
                kind: AnomalyKind::RepeatedRejections
            }]
        );
    }

    #[test]
    fn retransmit_outlier_with_zero_mad() {
        // Most peers have no retransmits at all (MAD 0): the floor makes the flood peer's score
        // finite and over the threshold.
        let mut d = AnomalyDetector::new(AnomalyConfig {
            flag_after: 1,
            ..AnomalyConfig::default()
        });
        let mut samples: Vec<_> = (0..5).map(|i| sample(i, MB, 0.0, 0)).collect();
        samples.push(sample(5, MB, 40.0, 0));
        let ev = d.observe(1000, &samples);
        assert_eq!(ev.len(), 1, "{ev:?}");
        match &ev[0] {
            AnomalyEvent::Flagged {
                peer: 5,
                flag: AnomalyFlag::RetransmitOutlier { z, .. },
            } => assert!(z.is_finite() && *z >= 3.5),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn zero_mad_without_floor_falls_back_to_mean_deviation() {
        let t = MetricThresholds {
            min_value: 0.0,
            min_mad: 0.0,
            min_relative_mad: 0.0,
        };
        let z = robust_z_scores(&[0.0, 0.0, 0.0, 0.0, 0.0, 100.0], &t);
        // MeanAD = 100/6; z = 100 / (1.2533 · 16.67) ≈ 4.79.
        assert!((z[5] - 4.787).abs() < 0.01, "{z:?}");
        assert_eq!(z[0], 0.0);
        // All equal: nothing stands out.
        assert_eq!(robust_z_scores(&[5.0; 6], &t), vec![0.0; 6]);
        // Bad input is treated as zero, not propagated.
        let z = robust_z_scores(&[f64::NAN, f64::INFINITY, -3.0, 1.0], &t);
        assert!(z.iter().all(|x| x.is_finite()), "{z:?}");
    }

    #[test]
    fn the_textbook_modified_z_score() {
        let t = MetricThresholds {
            min_value: 0.0,
            min_mad: 0.0,
            min_relative_mad: 0.0,
        };
        // median 3, |dev| = [2,1,0,1,2,?]: values 1..5 and 30 → median 3.5, devs
        // [2.5,1.5,0.5,0.5,1.5,26.5] → MAD 1.5.
        let z = robust_z_scores(&[1.0, 2.0, 3.0, 4.0, 5.0, 30.0], &t);
        let want = 0.6745 * (30.0 - 3.5) / 1.5;
        assert!((z[5] - want).abs() < 1e-9, "{z:?}");
        assert!(z[0] < 0.0);
    }

    #[test]
    fn a_tight_cluster_does_not_turn_small_differences_into_flags() {
        let mut d = AnomalyDetector::new(AnomalyConfig {
            flag_after: 1,
            ..AnomalyConfig::default()
        });
        // Everyone at exactly 1 MB/s but one peer 10% above: MAD 0, floored at 5% of the median.
        let mut samples: Vec<_> = (0..6).map(|i| sample(i, MB, 0.0, 0)).collect();
        samples.push(sample(6, 1.1 * MB, 0.0, 0));
        assert!(d.observe(1000, &samples).is_empty());
    }

    #[test]
    fn the_peer_table_is_bounded_and_stale_peers_are_forgotten() {
        let mut d = AnomalyDetector::new(AnomalyConfig {
            max_peers: 4,
            flag_after: 1,
            rejection_threshold: 1,
            forget_after_ms: 10_000,
            ..AnomalyConfig::default()
        });
        // Peer 0 is flagged (rejections) and must survive eviction.
        let ev = d.observe(1000, &[sample(0, 0.0, 0.0, 1)]);
        assert_eq!(ev.len(), 1);
        for (i, now) in (1..20u32).zip((2000..).step_by(100)) {
            d.observe(now, &[sample(i, 0.0, 0.0, 0)]);
            assert!(d.tracked_peers() <= 4);
        }
        assert!(d.is_flagged(&0));
        // Not seen for longer than forget_after_ms: forgotten, flag cleared.
        let ev = d.observe(20_000, &[sample(50, 0.0, 0.0, 0)]);
        assert!(ev.contains(&AnomalyEvent::Cleared {
            peer: 0,
            kind: AnomalyKind::RepeatedRejections
        }));
        assert!(!d.is_flagged(&0));
    }

    #[test]
    fn a_tick_with_more_peers_than_the_bound_keeps_the_known_ones() {
        let mut d = AnomalyDetector::new(AnomalyConfig {
            max_peers: 3,
            flag_after: 2,
            rejection_threshold: 1,
            ..AnomalyConfig::default()
        });
        // Peers 5, 6, 7 are known; peer 7 is one anomalous tick from being flagged.
        d.observe(
            1000,
            &[
                sample(5, 0.0, 0.0, 0),
                sample(6, 0.0, 0.0, 0),
                sample(7, 0.0, 0.0, 1),
            ],
        );
        // Next tick also brings 0..4 (sorted before them): they must not evict 5, 6, 7.
        let mut samples: Vec<_> = (0..5).map(|i| sample(i, 0.0, 0.0, 0)).collect();
        samples.extend([
            sample(5, 0.0, 0.0, 0),
            sample(6, 0.0, 0.0, 0),
            sample(7, 0.0, 0.0, 1),
        ]);
        let ev = d.observe(2000, &samples);
        assert_eq!(
            ev,
            vec![AnomalyEvent::Flagged {
                peer: 7,
                flag: AnomalyFlag::RepeatedRejections { count: 1 }
            }]
        );
        assert_eq!(d.tracked_peers(), 3);
    }

    #[test]
    fn sample_order_and_duplicates_do_not_matter() {
        let mut a = AnomalyDetector::new(AnomalyConfig {
            flag_after: 1,
            ..AnomalyConfig::default()
        });
        let mut b = a.clone();
        let samples = mesh(6, &[sample(99, 50.0 * MB, 0.0, 0)]);
        let mut shuffled = samples.clone();
        shuffled.reverse();
        // A later duplicate of peer 3 is ignored.
        shuffled.push(sample(3, 0.0, 0.0, 0));
        let ea = a.observe(1000, &samples);
        let eb = b.observe(1000, &shuffled);
        assert_eq!(ea, eb);
        assert_eq!(ea.len(), 1);
    }

    #[test]
    fn bad_config_is_sanitized() {
        let d: AnomalyDetector<u32> = AnomalyDetector::new(AnomalyConfig {
            z_threshold: f64::NAN,
            min_peers: 0,
            flag_after: 0,
            clear_after: 0,
            max_peers: 0,
            ..AnomalyConfig::default()
        });
        let c = d.config();
        assert_eq!(c.z_threshold, 3.5);
        assert_eq!(
            (c.min_peers, c.flag_after, c.clear_after, c.max_peers),
            (3, 1, 1, 1)
        );
    }

    #[test]
    fn flags_round_trip_through_serde_and_describe_themselves() {
        for f in [
            AnomalyFlag::RepeatedRejections { count: 4 },
            AnomalyFlag::TrafficOutlier {
                z: 9.5,
                value: 5.0 * MB,
                median: MB,
            },
        ] {
            let bytes =
                bincode::serde::encode_to_vec(&f, bincode::config::standard()).expect("encode");
            let (back, _): (AnomalyFlag, usize) =
                bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                    .expect("decode");
            assert_eq!(back, f);
        }
        let f = AnomalyFlag::RepeatedRejections { count: 4 };
        assert_eq!(f.kind().as_str(), "repeated_rejections");
        assert_eq!(f.kind().to_string(), "repeated_rejections");
        assert!(f.detail().contains('4'));
    }
}
