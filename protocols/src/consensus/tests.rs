//! Engines wired directly to each other on virtual time: agreement, rotation of the proposer,
//! rejection of forged or foreign messages, buffering of the next heights, and byzantine votes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ed25519_dalek::SigningKey;

use super::*;
use crate::{
    PeerKey, WireError,
    ledger::{Block, QuorumCertificate, verify_certificate},
};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn config() -> ConsensusConfig {
    ConsensusConfig::default()
        .with_propose_ms(300)
        .with_prevote_ms(100)
        .with_precommit_ms(100)
        .with_rebroadcast_ms(200)
        .with_round_delta_ms(50)
}

/// Whether to lose a message (from, to, message).
type DropFilter = Box<dyn FnMut(usize, usize, &ConsensusMessage) -> bool>;

/// Peers on virtual time: messages are delivered in order, timers fire when nothing is in flight.
struct Net {
    keys: Vec<SigningKey>,
    engines: Vec<ConsensusEngine>,
    committee: Committee,
    now_ms: u64,
    queue: VecDeque<(usize, ConsensusMessage)>,
    timers: BTreeMap<(u64, u64), (usize, TimeoutKey)>,
    timer_seq: u64,
    decided: Vec<BTreeMap<u64, (Block, QuorumCertificate)>>,
    down: BTreeSet<usize>,
    target_height: u64,
    /// Whether to lose a message (from, to, message).
    drop: DropFilter,
}

impl Net {
    fn new(n: u8, target_height: u64) -> Self {
        let keys: Vec<SigningKey> = (1..=n).map(key).collect();
        let committee = Committee::new(keys.iter().map(|k| k.verifying_key().to_bytes()).collect());
        let engines = keys
            .iter()
            .map(|k| ConsensusEngine::new(k.clone(), config()))
            .collect();
        Self {
            decided: vec![BTreeMap::new(); keys.len()],
            keys,
            engines,
            committee,
            now_ms: 0,
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            down: BTreeSet::new(),
            target_height,
            drop: Box::new(|_, _, _| false),
        }
    }

    fn index_of(&self, peer: &PeerKey) -> usize {
        self.keys
            .iter()
            .position(|k| &k.verifying_key().to_bytes() == peer)
            .expect("a member")
    }

    fn start(&mut self) {
        for i in 0..self.engines.len() {
            if !self.down.contains(&i) {
                let actions =
                    self.engines[i].start_height(0, None, self.committee.clone(), self.now_ms);
                self.apply(i, actions);
            }
        }
    }

    fn block(&self, i: usize, height: u64) -> Block {
        let prev_hash = match height.checked_sub(1) {
            Some(h) => self.decided[i]
                .get(&h)
                .map(|(b, _)| b.hash())
                .unwrap_or([0; 32]),
            None => [0; 32],
        };
        Block {
            height,
            prev_hash,
            proposer: self.keys[i].verifying_key().to_bytes(),
            timestamp_unix_ms: self.now_ms,
            entries: vec![],
        }
    }

    fn apply(&mut self, i: usize, actions: Vec<ConsensusAction>) {
        let mut work = VecDeque::from(actions);
        while let Some(action) = work.pop_front() {
            match action {
                ConsensusAction::Broadcast(message) => {
                    for j in 0..self.engines.len() {
                        if j != i {
                            self.queue.push_back((j, message.clone()));
                        }
                    }
                }
                ConsensusAction::ScheduleTimeout { key, after_ms } => {
                    self.timer_seq += 1;
                    self.timers
                        .insert((self.now_ms + after_ms, self.timer_seq), (i, key));
                }
                ConsensusAction::RequestValue { height, round } => {
                    let block = self.block(i, height);
                    work.extend(self.engines[i].propose(height, round, block, self.now_ms));
                }
                ConsensusAction::Decided { block, certificate } => {
                    let height = block.height;
                    assert_eq!(
                        verify_certificate(&block, &certificate, &self.committee.to_set()),
                        Ok(())
                    );
                    self.decided[i].insert(height, (block.clone(), certificate));
                    if height + 1 < self.target_height {
                        work.extend(self.engines[i].start_height(
                            height + 1,
                            Some(&block),
                            self.committee.clone(),
                            self.now_ms,
                        ));
                    }
                }
                ConsensusAction::NewRound { .. } => {}
            }
        }
    }

    /// Delivers one message or fires one timer; false when nothing is left.
    fn step(&mut self) -> bool {
        if let Some((to, message)) = self.queue.pop_front() {
            let from = self.index_of(&message.author());
            if (self.drop)(from, to, &message) || self.down.contains(&to) {
                return true;
            }
            let actions = self.engines[to].on_message(message, self.now_ms, &mut |_| true);
            self.apply(to, actions);
            return true;
        }
        let Some(((at, seq), (i, key))) = self.timers.pop_first() else {
            return false;
        };
        let _ = seq;
        self.now_ms = self.now_ms.max(at);
        if !self.down.contains(&i) {
            let actions = self.engines[i].on_timeout(key, self.now_ms);
            self.apply(i, actions);
        }
        true
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.engines.len()).filter(|i| !self.down.contains(i))
    }

    /// Runs until every live peer decided every height below the target, or `max_ms` passes.
    fn run(&mut self, max_ms: u64) {
        while self.now_ms <= max_ms {
            let done = self
                .live()
                .all(|i| self.decided[i].len() as u64 >= self.target_height);
            if done || !self.step() {
                return;
            }
        }
    }

    fn assert_agreement(&self) {
        let mut by_height: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        for decided in &self.decided {
            for (height, (block, _)) in decided {
                let hash = *by_height.entry(*height).or_insert(block.hash());
                assert_eq!(hash, block.hash(), "two blocks decided at height {height}");
            }
        }
    }
}

#[test]
fn four_honest_engines_decide_the_same_blocks() {
    let mut net = Net::new(4, 5);
    net.start();
    net.run(60_000);
    net.assert_agreement();
    for i in 0..4 {
        assert_eq!(net.decided[i].len(), 5, "peer {i} decided every height");
    }
    // Round-robin: with no failure, each height is decided in round 0 by its rotation's proposer.
    for (height, (block, certificate)) in &net.decided[0] {
        assert_eq!(certificate.round, 0);
        assert_eq!(Some(block.proposer), net.committee.proposer(*height, 0));
    }
    let proposers: BTreeSet<PeerKey> = net.decided[0].values().map(|(b, _)| b.proposer).collect();
    assert_eq!(
        proposers.len(),
        4,
        "the coordinator rotates over the committee"
    );
    for engine in &net.engines {
        assert_eq!(engine.last_core_error(), None);
    }
}

#[test]
fn a_silent_proposer_is_replaced_by_the_next_in_rotation() {
    let mut net = Net::new(4, 3);
    let first = net.index_of(&net.committee.proposer(0, 0).expect("proposer"));
    net.down.insert(first);
    net.start();
    net.run(60_000);
    net.assert_agreement();
    let survivor = net.live().next().expect("a live peer");
    assert_eq!(net.decided[survivor].len(), 3);
    let (genesis, certificate) = &net.decided[survivor][&0];
    assert!(certificate.round >= 1, "round 0 had no proposal");
    assert_ne!(genesis.proposer, net.keys[first].verifying_key().to_bytes());
    assert_eq!(
        Some(genesis.proposer),
        net.committee.proposer(0, certificate.round)
    );
}

#[test]
fn messages_with_bad_signatures_from_non_members_or_non_proposers_are_rejected() {
    let committee = Committee::new((1..=4).map(|s| key(s).verifying_key().to_bytes()).collect());
    let mut engine = ConsensusEngine::new(key(1), config());
    let vote = ConsensusMessage::signed_vote(&key(2), VoteKind::Prevote, 0, 0, Some([7; 32]));
    assert_eq!(
        engine.handle_message(vote.clone(), 0, &mut |_| true),
        Err(ConsensusError::NotStarted)
    );
    engine.start_height(0, None, committee.clone(), 0);

    // A forged signature.
    let mut forged = vote.clone();
    if let ConsensusMessage::Vote { signature, .. } = &mut forged {
        signature[0] ^= 1;
    }
    let voter = key(2).verifying_key().to_bytes();
    assert_eq!(
        engine.handle_message(forged, 0, &mut |_| true),
        Err(ConsensusError::BadSignature(voter))
    );
    // Signed by one member in the name of another.
    let mut impostor = ConsensusMessage::signed_vote(&key(3), VoteKind::Prevote, 0, 0, None);
    if let ConsensusMessage::Vote { voter: v, .. } = &mut impostor {
        *v = voter;
    }
    assert!(matches!(
        engine.handle_message(impostor, 0, &mut |_| true),
        Err(ConsensusError::BadSignature(_))
    ));
    // A short signature.
    let mut short = vote.clone();
    if let ConsensusMessage::Vote { signature, .. } = &mut short {
        signature.truncate(10);
    }
    assert!(matches!(
        engine.handle_message(short, 0, &mut |_| true),
        Err(ConsensusError::BadSignature(_))
    ));
    // A non-member, validly signed.
    let outsider = ConsensusMessage::signed_vote(&key(9), VoteKind::Prevote, 0, 0, None);
    assert_eq!(
        engine.handle_message(outsider, 0, &mut |_| true),
        Err(ConsensusError::NotMember(key(9).verifying_key().to_bytes()))
    );
    // A proposal from a member who is not the round's proposer.
    let proposer = committee.proposer(0, 0).expect("proposer");
    let other = (1..=4)
        .map(key)
        .find(|k| k.verifying_key().to_bytes() != proposer)
        .expect("another member");
    let block = Block {
        height: 0,
        prev_hash: [0; 32],
        proposer: other.verifying_key().to_bytes(),
        timestamp_unix_ms: 0,
        entries: vec![],
    };
    let proposal = ConsensusMessage::signed_proposal(&other, 0, 0, None, block);
    assert!(matches!(
        engine.handle_message(proposal, 0, &mut |_| true),
        Err(ConsensusError::NotProposer { .. })
    ));
    // Too far ahead, in height or in round.
    let far = ConsensusMessage::signed_vote(&key(2), VoteKind::Prevote, 5, 0, None);
    assert!(matches!(
        engine.handle_message(far, 0, &mut |_| true),
        Err(ConsensusError::TooFarAhead { .. })
    ));
    let far_round = ConsensusMessage::signed_vote(&key(2), VoteKind::Prevote, 0, 1_000, None);
    assert!(matches!(
        engine.handle_message(far_round, 0, &mut |_| true),
        Err(ConsensusError::TooFarAhead { .. })
    ));
    // The genuine vote passes.
    assert!(engine.handle_message(vote, 0, &mut |_| true).is_ok());
}

#[test]
fn decode_of_garbage_or_oversized_bytes_errors() {
    let vote: ConsensusMessage =
        ConsensusMessage::signed_vote(&key(2), VoteKind::Precommit, 3, 1, Some([1; 32]));
    let bytes = vote.to_bytes();
    assert_eq!(ConsensusMessage::from_bytes(&bytes), Ok(vote));
    assert!(ConsensusMessage::<Block>::from_bytes(&[0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(ConsensusMessage::<Block>::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        ConsensusMessage::<Block>::from_bytes(&trailing),
        Err(WireError::Trailing(1))
    );
    let huge = vec![0u8; MAX_CONSENSUS_MESSAGE_BYTES + 1];
    assert!(matches!(
        ConsensusMessage::<Block>::from_bytes(&huge),
        Err(WireError::TooLarge { .. })
    ));
    // A proposal claiming a block with 2^40 entries in a few bytes does not allocate.
    let mut lying = vec![0u8]; // Proposal
    lying.extend_from_slice(&[0, 0, 0, 0]); // height, round, pol_round None, block.height
    lying.extend_from_slice(&[0; 32]); // prev_hash
    lying.extend_from_slice(&[0; 32]); // proposer
    lying.push(0); // timestamp
    lying.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 1, 0, 0]); // entries: 2^40
    assert!(ConsensusMessage::<Block>::from_bytes(&lying).is_err());
}

#[test]
fn messages_for_the_next_height_are_kept_and_replayed() {
    // Peer 0 is cut off while the others decide heights 0 and 1; what was sent to it is kept.
    let mut net = Net::new(4, 2);
    let captured = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = captured.clone();
    net.drop = Box::new(move |_, to, message| {
        if to == 0 {
            sink.borrow_mut().push(message.clone());
        }
        to == 0
    });
    net.down.insert(0);
    net.start();
    net.run(60_000);
    for i in 1..4 {
        assert_eq!(net.decided[i].len(), 2);
    }
    // Peer 0 comes back at height 0 and receives everything late: height 1 is kept for later.
    net.engines[0].start_height(0, None, net.committee.clone(), net.now_ms);
    let mut kept = 0;
    for message in captured.borrow().iter() {
        let result = net.engines[0].handle_message(message.clone(), net.now_ms, &mut |_| true);
        if message.height() == 1 {
            assert_eq!(result, Ok(vec![]));
            kept += 1;
        }
    }
    assert!(kept > 0);
    // It catches up on height 0 from a decided pair, then starts height 1: the kept proposal and
    // votes decide it without any new message from the network.
    let (genesis, certificate) = net.decided[1][&0].clone();
    assert_eq!(
        verify_decided(&genesis, &certificate, None, &net.committee),
        Ok(())
    );
    let mut actions =
        net.engines[0].start_height(1, Some(&genesis), net.committee.clone(), net.now_ms);
    // Kept proposals wait for the host's validation, which the next message brings.
    let again = captured
        .borrow()
        .iter()
        .find(|m| m.height() == 1 && matches!(m, ConsensusMessage::Vote { .. }))
        .cloned()
        .expect("a kept vote");
    actions.extend(net.engines[0].on_message(again, net.now_ms, &mut |_| true));
    let decided = actions.iter().find_map(|a| match a {
        ConsensusAction::Decided { block, .. } => Some(block.clone()),
        _ => None,
    });
    assert_eq!(decided, Some(net.decided[1][&1].0.clone()));
}

#[test]
fn a_byzantine_double_vote_does_not_break_agreement() {
    // Peer 3 is byzantine: whatever it votes, it also signs the opposite (another hash or nil)
    // and sends the two to different halves of the committee.
    let mut net = Net::new(4, 4);
    let byzantine = 3usize;
    let evil = net.keys[byzantine].clone();
    let evil_key = evil.verifying_key().to_bytes();
    net.start();
    let mut steps = 0;
    while steps < 200_000 {
        steps += 1;
        let Some((to, message)) = net.queue.front().cloned() else {
            if !net.step() {
                break;
            }
            continue;
        };
        if message.author() == evil_key
            && let ConsensusMessage::Vote {
                kind,
                height,
                round,
                value,
                ..
            } = &message
        {
            net.queue.pop_front();
            let other = match value {
                Some(_) => None,
                None => Some([0xee; 32]),
            };
            let twin = ConsensusMessage::signed_vote(&evil, *kind, *height, *round, other);
            let message = if to % 2 == 0 { message.clone() } else { twin };
            let actions = net.engines[to].on_message(message, net.now_ms, &mut |_| true);
            net.apply(to, actions);
            continue;
        }
        net.step();
        if (0..3).all(|i| net.decided[i].len() as u64 >= net.target_height) {
            break;
        }
    }
    net.assert_agreement();
    for i in 0..3 {
        assert_eq!(
            net.decided[i].len(),
            4,
            "honest peer {i} decided every height"
        );
    }
}

/// Own votes among `actions`.
fn own_votes(actions: &[ConsensusAction], me: &PeerKey) -> Vec<ConsensusMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            ConsensusAction::Broadcast(m @ ConsensusMessage::Vote { voter, .. }) if voter == me => {
                Some(m.clone())
            }
            _ => None,
        })
        .collect()
}

/// Nil precommits of round 0 from `others`, then the precommit timeout: the engine enters round 1.
fn nil_round_zero(engine: &mut ConsensusEngine, others: &[SigningKey]) {
    let mut actions = Vec::new();
    for k in others {
        let nil = ConsensusMessage::signed_vote(k, VoteKind::Precommit, 0, 0, None);
        actions.extend(engine.on_message(nil, 0, &mut |_| true));
    }
    for action in actions {
        if let ConsensusAction::ScheduleTimeout { key, .. } = action
            && key.kind == TimeoutKind::Precommit
        {
            engine.on_timeout(key, 1_000);
        }
    }
    assert_eq!(engine.round(), 1);
}

#[test]
fn a_restarted_peer_replays_its_log_and_keeps_its_votes_and_its_lock() {
    let keys: Vec<SigningKey> = (1..=4).map(key).collect();
    let committee = Committee::new(keys.iter().map(|k| k.verifying_key().to_bytes()).collect());
    let key_of = |peer: PeerKey| {
        keys.iter()
            .find(|k| k.verifying_key().to_bytes() == peer)
            .cloned()
            .expect("a member")
    };
    let (p0, p1) = (
        committee.proposer(0, 0).expect("proposer"),
        committee.proposer(0, 1).expect("proposer"),
    );
    let me_key = keys
        .iter()
        .find(|k| ![p0, p1].contains(&k.verifying_key().to_bytes()))
        .cloned()
        .expect("a member proposing neither round");
    let me = me_key.verifying_key().to_bytes();
    let others: Vec<SigningKey> = keys.iter().filter(|k| **k != me_key).cloned().collect();
    let block = |proposer: PeerKey, timestamp_unix_ms: u64| Block {
        height: 0,
        prev_hash: [0; 32],
        proposer,
        timestamp_unix_ms,
        entries: vec![],
    };

    // Round 0: a proposal for A and two other prevotes for it: this peer prevotes A, sees the
    // polka, precommits A and locks on it.
    let a = block(p0, 1);
    let mut engine = ConsensusEngine::new(me_key.clone(), config());
    let mut sent = engine.start_height(0, None, committee.clone(), 0);
    let proposal_a = ConsensusMessage::signed_proposal(&key_of(p0), 0, 0, None, a.clone());
    sent.extend(engine.on_message(proposal_a, 0, &mut |_| true));
    for k in others
        .iter()
        .filter(|k| k.verifying_key().to_bytes() != p1)
        .take(2)
    {
        let prevote = ConsensusMessage::signed_vote(k, VoteKind::Prevote, 0, 0, Some(a.hash()));
        sent.extend(engine.on_message(prevote, 0, &mut |_| true));
    }
    let before = own_votes(&sent, &me);
    assert!(before.contains(&ConsensusMessage::signed_vote(
        &me_key,
        VoteKind::Precommit,
        0,
        0,
        Some(a.hash())
    )));

    // The peer restarts: replaying its log gives back exactly the votes it had sent.
    let wal = engine.wal().to_vec();
    let encoded: Vec<Vec<u8>> = wal.iter().map(WalEntry::to_bytes).collect();
    let decoded: Vec<WalEntry> = encoded
        .iter()
        .map(|b| WalEntry::from_bytes(b).expect("decodes"))
        .collect();
    assert_eq!(decoded, wal);
    let mut restarted = ConsensusEngine::new(me_key.clone(), config());
    let replayed = restarted.recover(0, None, committee.clone(), &decoded, 0);
    assert_eq!(own_votes(&replayed, &me), before);

    // Round 1 proposes B without a proof of lock. The restarted peer is still locked on A and
    // prevotes nil, as the original would; a peer that forgot its lock would prevote B.
    let b = block(p1, 2);
    let proposal_b = ConsensusMessage::signed_proposal(&key_of(p1), 0, 1, None, b.clone());
    let mut amnesiac = ConsensusEngine::new(me_key.clone(), config());
    amnesiac.start_height(0, None, committee.clone(), 0);
    for (engine, expected) in [
        (&mut engine, None),
        (&mut restarted, None),
        (&mut amnesiac, Some(b.hash())),
    ] {
        nil_round_zero(engine, &others);
        let actions = engine.on_message(proposal_b.clone(), 1_000, &mut |_| true);
        let prevote = ConsensusMessage::signed_vote(&me_key, VoteKind::Prevote, 0, 1, expected);
        assert!(
            own_votes(&actions, &me).contains(&prevote),
            "expected prevote {expected:?}: {actions:?}"
        );
    }
}

#[test]
fn a_decided_pair_with_a_bad_certificate_is_refused() {
    let mut net = Net::new(4, 1);
    net.start();
    net.run(60_000);
    let (block, certificate) = net.decided[0][&0].clone();
    assert_eq!(
        verify_decided(&block, &certificate, None, &net.committee),
        Ok(())
    );
    let mut short = certificate.clone();
    short.votes.truncate(2);
    assert!(verify_decided(&block, &short, None, &net.committee).is_err());
    let mut other_round = certificate.clone();
    other_round.round += 1;
    assert!(verify_decided(&block, &other_round, None, &net.committee).is_err());
    let mut other_block = block.clone();
    other_block.timestamp_unix_ms += 1;
    assert!(verify_decided(&other_block, &certificate, None, &net.committee).is_err());
}

#[test]
fn a_polka_relayed_whole_counts_even_against_an_equivocators_other_prevote() {
    // Members by rotation: m[0] proposes round 0, m[1] round 1; this peer is m[2]; m[3] is
    // byzantine. Round 0: this peer missed the proposal of A and prevoted nil; the byzantine
    // member prevoted nil to it but A to the others, who saw a polka for A. Round 1: m[1]
    // re-proposes A with that polka.
    let committee = Committee::new((1..=4).map(|s| key(s).verifying_key().to_bytes()).collect());
    let m: Vec<SigningKey> = committee
        .members()
        .iter()
        .map(|pk| {
            (1..=4)
                .map(key)
                .find(|k| &k.verifying_key().to_bytes() == pk)
                .expect("a member")
        })
        .collect();
    let me = m[2].verifying_key().to_bytes();
    let a = Block {
        height: 0,
        prev_hash: [0; 32],
        proposer: m[0].verifying_key().to_bytes(),
        timestamp_unix_ms: 5,
        entries: vec![],
    };
    let prevote =
        |k: &SigningKey, value| ConsensusMessage::signed_vote(k, VoteKind::Prevote, 0, 0, value);
    let run_round_one = |whole: bool| {
        let mut engine = ConsensusEngine::new(m[2].clone(), config());
        let actions = engine.start_height(0, None, committee.clone(), 0);
        for action in actions {
            if let ConsensusAction::ScheduleTimeout { key, .. } = action
                && key.kind == TimeoutKind::Propose
            {
                engine.on_timeout(key, 300);
            }
        }
        for message in [
            prevote(&m[3], None),
            prevote(&m[0], Some(a.hash())),
            prevote(&m[1], Some(a.hash())),
        ] {
            engine.on_message(message, 300, &mut |_| true);
        }
        nil_round_zero(&mut engine, &[m[0].clone(), m[1].clone(), m[3].clone()]);
        let polka = [&m[0], &m[1], &m[3]].map(|k| prevote(k, Some(a.hash())));
        let mut actions = Vec::new();
        if whole {
            let certificate = ConsensusMessage::PolkaCertificate {
                height: 0,
                round: 0,
                block_hash: a.hash(),
                votes: polka
                    .iter()
                    .map(|v| (v.author(), v.signature().unwrap_or_default().to_vec()))
                    .collect(),
                sender: m[1].verifying_key().to_bytes(),
            };
            actions.extend(
                engine
                    .handle_message(certificate, 1_000, &mut |_| true)
                    .expect("a valid certificate"),
            );
        } else {
            for vote in polka {
                actions.extend(engine.on_message(vote, 1_000, &mut |_| true));
            }
        }
        let reproposal = ConsensusMessage::signed_proposal(&m[1], 0, 1, Some(0), a.clone());
        actions.extend(engine.on_message(reproposal, 1_000, &mut |_| true));
        own_votes(&actions, &me)
    };
    let accept = ConsensusMessage::signed_vote(&m[2], VoteKind::Prevote, 0, 1, Some(a.hash()));
    let refuse = ConsensusMessage::signed_vote(&m[2], VoteKind::Prevote, 0, 1, None);
    // Vote by vote, the byzantine member's prevote for A is dropped as a conflict: no polka.
    assert!(!run_round_one(false).contains(&accept));
    // As a whole, the certificate proves the polka: this peer prevotes the re-proposal.
    let votes = run_round_one(true);
    assert!(votes.contains(&accept), "{votes:?}");
    assert!(!votes.contains(&refuse));
}

#[test]
fn a_polka_certificate_short_of_a_quorum_or_forged_is_refused() {
    let committee = Committee::new((1..=4).map(|s| key(s).verifying_key().to_bytes()).collect());
    let mut engine: ConsensusEngine = ConsensusEngine::new(key(1), config());
    engine.start_height(0, None, committee, 0);
    let hash = [3; 32];
    let signed = |s: u8| {
        let vote = ConsensusMessage::signed_vote(&key(s), VoteKind::Prevote, 0, 0, Some(hash));
        (vote.author(), vote.signature().unwrap_or_default().to_vec())
    };
    let certificate = |votes: Vec<(PeerKey, Vec<u8>)>| ConsensusMessage::PolkaCertificate {
        height: 0,
        round: 0,
        block_hash: hash,
        votes,
        sender: key(2).verifying_key().to_bytes(),
    };
    let refused = ConsensusError::BadCertificate {
        height: 0,
        round: 0,
    };
    let mut engine_says = |message| engine.handle_message(message, 0, &mut |_| true).map(|_| ());
    assert_eq!(
        engine_says(certificate(vec![signed(2), signed(3)])),
        Err(refused.clone())
    );
    assert_eq!(
        engine_says(certificate(vec![signed(2), signed(3), signed(3)])),
        Err(refused.clone())
    );
    let mut forged = signed(4);
    forged.1[0] ^= 1;
    assert_eq!(
        engine_says(certificate(vec![signed(2), signed(3), forged])),
        Err(refused.clone())
    );
    assert_eq!(
        engine_says(certificate(vec![signed(2), signed(3), signed(9)])),
        Err(refused)
    );
    assert_eq!(
        engine_says(certificate(vec![signed(2), signed(3), signed(4)])),
        Ok(())
    );
}
