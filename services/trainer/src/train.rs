//! The distillation loop: trains a drafter (the self-drafter's exit adapter, or the draft model's LoRA
//! adapters: [`crate::learner`]) on the samples the targets capture, while this trainer leads and the
//! cluster is idle, and publishes what passes the gate.
//!
//! It runs on a thread of its own (training is CPU work, not async work; the few store operations run on
//! the service's runtime through its handle). Before every optimizer step it checks leadership and the
//! [`IdleGate`], so it yields within one step when load rises; a step is one batch (64 positions by
//! default for the exit adapter: about 0.14 s for SmolLM2 on two cores; two sequences for LoRA, a few
//! seconds for the Qwen 0.5B). It trains on what is new, in arrival order: each round takes the oldest
//! samples not trained on yet (at most a few), turns them into the learner's items (for the exit adapter
//! the drafter's exit states, recomputed with the engine's own kernels) and keeps the positions the mask
//! selects (OSD's default: where the target rejected the draft).
//!
//! On becoming leader it resumes from the live version (its adapter read from the weight store, or
//! fetched from the trainer that published it), so a standby or a restarted trainer goes on from the
//! last published version. Every `eval_every` steps it measures the held-out expected acceptance of the
//! live version and of the candidate on the same recent held-out samples; a candidate that beats the
//! live one by the gate's margin is published ([`Publisher::publish`]). About once a second, even when
//! busy, it checks the live version ([`Publisher::watch_once`]): a refused file or a live regression
//! rolls back, and training resumes from the restored version.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specd_core::PositionMask;
use specd_engine::exit_train::{ExitConfig, ExitTrainer};
use specd_engine::lora_train::{LoraConfig, LoraTrainer};
use specd_engine::{Model, TrainedWeights};
use specd_service::Shutdown;

use crate::buffer::{ReplayBuffer, Sample};
use crate::idle::IdleGate;
use crate::learner::Learner;
use crate::publish::{GateConfig, GateFigures, LiveCounts, Publisher};
use crate::service::TrainingStatus;

/// How the loop trains.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The shelf (drafter kind) trained for: `self` trains an exit adapter, `model` LoRA adapters.
    pub kind: String,
    pub exit: ExitConfig,
    pub lora: LoraConfig,
    pub mask: PositionMask,
    /// Positions per optimizer step (exit adapter).
    pub batch: usize,
    /// Sequences per optimizer step (LoRA).
    pub lora_batch: usize,
    /// Steps between two held-out evaluations.
    pub eval_every: u64,
    /// Held-out positions evaluated, at most.
    pub eval_positions: usize,
    pub gate: GateConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            kind: "self".into(),
            exit: ExitConfig::default(),
            lora: LoraConfig::default(),
            mask: PositionMask::Rejected,
            batch: 64,
            lora_batch: 2,
            eval_every: 20,
            eval_positions: 512,
            gate: GateConfig::default(),
        }
    }
}

/// Samples taken per round.
const ROUND: usize = 16;
/// Pause while there is nothing to do (not leading, busy, nothing new).
const PAUSE: Duration = Duration::from_millis(100);
/// Times each new position may be replayed, in all, while nothing new arrives (a few epochs over recent
/// traffic; the gate, on held-out samples, decides whether it helped).
const REPLAY_FACTOR: usize = 4;
/// Most positions kept for replay (newest kept).
const REPLAY_POSITIONS: usize = 16_384;
/// How often the live version is checked for a rollback.
const WATCH: Duration = Duration::from_secs(1);

/// What the loop shares with the service.
pub struct Shared {
    pub buffer: Arc<Mutex<ReplayBuffer>>,
    pub status: Arc<Mutex<TrainingStatus>>,
    pub leader: Arc<AtomicBool>,
    pub live: LiveCounts,
}

/// Where the loop publishes: the publisher and the runtime its store calls run on.
#[derive(Clone)]
pub struct Publishing {
    pub publisher: Publisher,
    pub runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the loop on its own thread; it ends when `stop` fires. Without `publishing` it trains and
/// evaluates but publishes nothing. The drafter kind (`cfg.kind`) picks what is trained: `model`, the
/// draft model's LoRA adapters; anything else, the exit adapter of the self-drafter `drafter`.
pub fn spawn(
    drafter: Model,
    cfg: TrainConfig,
    shared: Shared,
    gate: IdleGate,
    publishing: Option<Publishing>,
    stop: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("specd-trainer".into())
        .spawn(move || {
            let p = publishing.as_ref();
            let result = match cfg.kind.as_str() {
                "model" => run::<LoraTrainer>(&drafter, &cfg, &shared, &gate, p, &stop),
                _ => run::<ExitTrainer>(&drafter, &cfg, &shared, &gate, p, &stop),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "the training loop stopped");
            }
        })
}

/// The training state of one leadership term.
struct Term<L: Learner> {
    trainer: L,
    /// The live version's weights (`None`: the plain drafter), for the gate's comparison.
    live: Option<TrainedWeights>,
    /// The live weights' held-out figure and the held-out samples (`seq`) it was measured on: the
    /// live version does not change between publishes, so an evaluation on the same samples reuses it
    /// (for LoRA each measurement is a forward of the draft model over every held-out context).
    live_figure: Option<(Vec<u64>, f64)>,
    trained_upto: u64,
    pending: Vec<L::Item>,
    /// Items already trained on once, kept for replay while there is nothing new.
    replay: std::collections::VecDeque<L::Item>,
    /// Replayed positions still allowed (each new position adds `REPLAY_FACTOR`).
    replay_credit: usize,
    /// Position of the replay cursor.
    replay_at: usize,
}

impl<L: Learner> Term<L> {
    /// Starts from the live version, or from scratch when nothing is published (or it cannot be read).
    fn start(
        drafter: &Model,
        cfg: &TrainConfig,
        publishing: Option<&Publishing>,
        status: &Mutex<TrainingStatus>,
    ) -> Result<Self, specd_engine::EngineError> {
        let live = publishing.and_then(|p| {
            match p.runtime.block_on(p.publisher.load_live(drafter)) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the live version; training from scratch");
                    None
                }
            }
        });
        let version = live.as_ref().map_or(0, |(v, _)| v.version);
        lock(status).live_version = version;
        metrics::gauge!("specd_trainer_live_version").set(version as f64);
        let trainer = match &live {
            Some((v, a)) => {
                tracing::info!(
                    version = v.version,
                    "resuming training from the live version"
                );
                L::resume(drafter, cfg, a)?
            }
            None => L::fresh(drafter, cfg)?,
        };
        Ok(Self {
            trainer,
            live: live.map(|(_, a)| a),
            trained_upto: 0,
            pending: Vec::new(),
            replay: std::collections::VecDeque::new(),
            replay_credit: 0,
            replay_at: 0,
            live_figure: None,
        })
    }

    /// A replay batch: positions trained before, walked in a stride that visits all of them, while the
    /// credit lasts.
    fn replay_batch(&mut self, batch: usize) -> Option<Vec<L::Item>> {
        if self.replay_credit < batch || self.replay.len() < batch {
            return None;
        }
        self.replay_credit -= batch;
        let n = self.replay.len();
        let out = (0..batch)
            .map(|_| {
                // A stride coprime to most lengths mixes positions of different samples.
                self.replay_at = (self.replay_at + 7919) % n;
                self.replay[self.replay_at].clone()
            })
            .collect();
        Some(out)
    }
}

fn run<L: Learner>(
    drafter: &Model,
    cfg: &TrainConfig,
    shared: &Shared,
    gate: &IdleGate,
    publishing: Option<&Publishing>,
    stop: &Shutdown,
) -> Result<(), specd_engine::EngineError> {
    let mut term: Option<Term<L>> = None;
    let batch = L::batch(cfg);
    let mut watched = Instant::now();
    while !stop.is_triggered() {
        if !shared.leader.load(Ordering::Relaxed) {
            term = None;
            std::thread::sleep(PAUSE);
            continue;
        }
        if watched.elapsed() >= WATCH {
            watched = Instant::now();
            if let Some(p) = publishing {
                match p.runtime.block_on(p.publisher.watch_once(&shared.live)) {
                    Ok(Some(restored)) => {
                        lock(&shared.status).rollbacks += 1;
                        tracing::warn!(
                            version = restored.version,
                            "training resumes from the restored version"
                        );
                        term = None;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "checking the live version failed"),
                }
            }
        }
        let t = match &mut term {
            Some(t) => t,
            None => term.insert(Term::start(drafter, cfg, publishing, &shared.status)?),
        };
        if !gate.may_train() {
            if !t.pending.is_empty() || gate.load().in_flight > 0 {
                lock(&shared.status).yielded += 1;
                metrics::counter!("specd_trainer_yielded_total").increment(1);
            }
            std::thread::sleep(PAUSE);
            continue;
        }
        if t.pending.len() < batch {
            // In arrival order, so that nothing between two rounds is skipped (what is too old has
            // been evicted already).
            let mut new = lock(&shared.buffer)
                .shelf(&cfg.kind)
                .map(|s| s.newer_than(t.trained_upto, usize::MAX))
                .unwrap_or_default();
            new.reverse();
            new.truncate(ROUND);
            if new.is_empty() {
                match t.replay_batch(batch) {
                    Some(chunk) => {
                        train_step(drafter, cfg, shared, gate, t, publishing, &chunk, "replay")?;
                    }
                    None => std::thread::sleep(PAUSE),
                }
                continue;
            }
            // One sample's exit states at a time, the gate checked before each: a request arriving
            // mid-round waits for one short forward at most, and what is left is taken up later.
            for s in &new {
                if !gate.may_train() {
                    break;
                }
                t.pending.extend(L::items(drafter, s, cfg.mask)?);
                t.trained_upto = s.seq;
            }
            continue;
        }
        let chunk: Vec<L::Item> = t.pending.drain(..batch).collect();
        train_step(drafter, cfg, shared, gate, t, publishing, &chunk, "new")?;
        // Trained once: kept for replay.
        t.replay_credit += chunk.len() * REPLAY_FACTOR;
        t.replay.extend(chunk);
        while t.replay.len() > REPLAY_POSITIONS {
            t.replay.pop_front();
        }
        t.replay_credit = t.replay_credit.min(t.replay.len() * REPLAY_FACTOR);
    }
    Ok(())
}

/// One optimizer step on `chunk`, then an evaluation when one is due.
#[allow(clippy::too_many_arguments)]
fn train_step<L: Learner>(
    drafter: &Model,
    cfg: &TrainConfig,
    shared: &Shared,
    gate: &IdleGate,
    t: &mut Term<L>,
    publishing: Option<&Publishing>,
    chunk: &[L::Item],
    source: &'static str,
) -> Result<(), specd_engine::EngineError> {
    let t0 = Instant::now();
    let loss = t.trainer.step(chunk)?;
    let took = t0.elapsed().as_secs_f64();
    metrics::histogram!("specd_trainer_step_seconds").record(took);
    metrics::counter!("specd_trainer_steps_total", "source" => source).increment(1);
    let positions = L::positions(chunk);
    metrics::counter!("specd_trainer_positions_total", "source" => source)
        .increment(positions as u64);
    metrics::gauge!("specd_trainer_loss").set(loss);
    let steps = {
        let mut st = lock(&shared.status);
        st.steps += 1;
        st.last_loss = loss;
        st.trained_positions += positions as u64;
        st.trained_seconds += took;
        st.steps
    };
    if steps % cfg.eval_every.max(1) == 0 || steps == 1 {
        evaluate(drafter, cfg, shared, gate, t, publishing)?;
    }
    Ok(())
}

/// Measures the live version and the candidate on recent held-out samples; publishes the candidate
/// when the gate lets it out.
fn evaluate<L: Learner>(
    drafter: &Model,
    cfg: &TrainConfig,
    shared: &Shared,
    gate: &IdleGate,
    t: &mut Term<L>,
    publishing: Option<&Publishing>,
) -> Result<(), specd_engine::EngineError> {
    let held: Vec<Arc<Sample>> = lock(&shared.buffer)
        .shelf(&cfg.kind)
        .map(|s| s.held_out().cloned().collect())
        .unwrap_or_default();
    let mut eval = Vec::new();
    let mut used = Vec::new();
    for s in &held {
        if L::positions(&eval) >= cfg.eval_positions {
            break;
        }
        if !gate.may_train() {
            // Load arrived: this evaluation is given up (the next one comes after more steps).
            return Ok(());
        }
        eval.extend(L::items(drafter, s, PositionMask::All)?);
        used.push(s.seq);
    }
    if L::positions(&eval) == 0 {
        return Ok(());
    }
    let live = match &t.live_figure {
        Some((on, v)) if *on == used => *v,
        _ => {
            let v = t.trainer.acceptance_of(t.live.as_ref(), &eval)?;
            t.live_figure = Some((used, v));
            v
        }
    };
    let figures = GateFigures {
        live,
        candidate: t.trainer.acceptance(&eval)?,
        positions: L::positions(&eval),
    };
    metrics::counter!("specd_trainer_evaluations_total").increment(1);
    metrics::gauge!("specd_trainer_gate_acceptance", "version" => "live").set(figures.live);
    metrics::gauge!("specd_trainer_gate_acceptance", "version" => "candidate")
        .set(figures.candidate);
    let (steps, rate) = {
        let mut st = lock(&shared.status);
        st.acceptance_live = figures.live;
        st.acceptance_candidate = figures.candidate;
        let rate = st.trained_positions as f64 / st.trained_seconds.max(1e-9);
        (st.steps, rate)
    };
    tracing::info!(
        live = figures.live,
        candidate = figures.candidate,
        positions = figures.positions,
        steps,
        trained_positions_per_s = rate as u64,
        "held-out expected acceptance"
    );
    let Some(p) = publishing else {
        return Ok(());
    };
    if !cfg.gate.passes(&figures) || !shared.leader.load(Ordering::Relaxed) {
        return Ok(());
    }
    let adapter = t.trainer.weights()?;
    match p.runtime.block_on(p.publisher.publish(&adapter, figures)) {
        Ok(v) => {
            t.live = Some(adapter);
            t.live_figure = None;
            let mut st = lock(&shared.status);
            st.live_version = v.version;
            st.publishes += 1;
        }
        Err(e) => tracing::warn!(error = %e, "publishing the candidate failed"),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::buffer::BufferConfig;
    use crate::service::{TrainerConfig, TrainerService};
    use crate::weights::WeightStore;
    use specd_coord::{LoadReport, Store};
    use specd_engine::testing::{write_tiny_model, TinySpec};
    use specd_engine::{load_gguf, Family, LogitsWanted};
    use specd_proto::internal::v1 as pb;

    /// A captured sample of narrow traffic: a variation of one of six sequences, with the target's
    /// top-16 at every position, as a target worker would send it.
    fn captured(target: &Model, s: u64) -> pb::DistillSample {
        let vocab = target.config().vocab as u64;
        let mut tokens: Vec<u32> = (0..20u64)
            .map(|i| (((s % 6) * 1_000_003 + i * 7919 + i * i * 104_729) % vocab) as u32)
            .collect();
        tokens[(s as usize * 7) % 20] = ((s * 31) % vocab) as u32;
        let logits = target
            .forward(&mut target.new_cache(), &tokens, LogitsWanted::All)
            .unwrap();
        let v = target.config().vocab;
        let n = tokens.len();
        let (mut positions, mut dists, mut tails) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..n {
            let t = specd_core::TopTarget::from_logits(&logits[j * v..(j + 1) * v], 16).unwrap();
            positions.push(j as u32 + 1);
            tails.push(t.tail() as f32);
            dists.push(pb::SparseDist {
                ids: t.ids().to_vec(),
                probs: t.probs().to_vec(),
            });
        }
        pb::DistillSample {
            model: "tiny".into(),
            drafter_kind: "self".into(),
            context_ids: tokens,
            positions,
            target: dists,
            rejected: vec![true; n],
            drafted: vec![true; n],
            draft_ids: vec![0; n],
            drafter_version: String::new(),
            tail_mass: tails,
        }
    }

    /// `captured(s)` with the target's distributions of another sequence: what a broken capture, or
    /// traffic the drafter cannot learn from, would teach.
    fn shuffled(target: &Model, s: u64) -> pb::DistillSample {
        let mut good = captured(target, s);
        good.target = captured(target, s + 3).target;
        good.tail_mass = captured(target, s + 3).tail_mass;
        good
    }

    struct Rig {
        _dir: tempfile::TempDir,
        target: Model,
        svc: TrainerService,
        store: Store,
        stop: Shutdown,
        gate: IdleGate,
        publisher: Publisher,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Rig {
        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            let mut spec = TinySpec::new(Family::Qwen2, 11);
            spec.layers = 4;
            spec.scale = 0.3;
            write_tiny_model(&path, &spec).unwrap();
            let target = load_gguf(&path).unwrap().model;
            let weights = WeightStore::open(dir.path().join("weights")).unwrap();
            let svc = TrainerService::new(TrainerConfig {
                model: "tiny".into(),
                vocab: target.config().vocab,
                buffer: BufferConfig {
                    eval_every: 5,
                    ..BufferConfig::default()
                },
                weights: weights.clone(),
            });
            svc.leader_flag().store(true, Ordering::Relaxed);
            let store = Store::memory();
            let stop = Shutdown::new();
            let gate = IdleGate::follow(store.clone(), 0, stop.clone())
                .await
                .unwrap();
            let publisher = Publisher {
                store: store.clone(),
                weights,
                model: "tiny".into(),
                kind: "self".into(),
                layers: 1,
                url: "127.0.0.1:1".into(),
                cfg: GateConfig::default(),
                keepalive: specd_service::grpc::Keepalive::default(),
            };
            Self {
                _dir: dir,
                target,
                svc,
                store,
                stop,
                gate,
                publisher,
                thread: None,
            }
        }

        fn start(&mut self) {
            let cfg = TrainConfig {
                exit: ExitConfig {
                    rank: 8,
                    lr: 3e-3,
                    ..ExitConfig::default()
                },
                eval_every: 5,
                ..TrainConfig::default()
            };
            let drafter = self.target.truncated(1).unwrap();
            self.start_with(drafter, cfg);
        }

        /// Starts the loop on `drafter` with `cfg` (its kind the publisher's).
        fn start_with(&mut self, drafter: Model, cfg: TrainConfig) {
            let shared = Shared {
                buffer: self.svc.buffer_handle(),
                status: self.svc.training_handle(),
                leader: self.svc.leader_flag(),
                live: self.svc.live_counts(),
            };
            let publishing = Publishing {
                publisher: self.publisher.clone(),
                runtime: tokio::runtime::Handle::current(),
            };
            self.thread = Some(
                spawn(
                    drafter,
                    cfg,
                    shared,
                    self.gate.clone(),
                    Some(publishing),
                    self.stop.clone(),
                )
                .unwrap(),
            );
        }

        /// A router reports load; returns once the gate has seen it.
        async fn make_busy(&self) {
            let busy = LoadReport {
                router: "r".into(),
                in_flight: 3,
                queue: 0,
                at: 0,
            };
            self.store.put_record(&busy, None).await.unwrap();
            while self.gate.may_train() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn status(&self) -> TrainingStatus {
            lock(&self.svc.training_handle()).clone()
        }

        async fn wait(&self, what: &str, done: impl Fn(&TrainingStatus) -> bool) {
            let end = Instant::now() + Duration::from_secs(90);
            while !done(&self.status()) {
                assert!(Instant::now() < end, "{what}: {:?}", self.status());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        fn stop(mut self) {
            self.stop.trigger();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loop_publishes_a_better_drafter_while_idle_and_yields_when_busy() {
        let mut rig = Rig::new().await;
        for s in 0..80 {
            assert!(rig.svc.submit(captured(&rig.target, s)));
        }
        rig.start();
        rig.wait("nothing published", |st| st.publishes >= 1).await;
        let (live, _) = rig.publisher.current().await.unwrap().unwrap();
        assert!(live.version >= 1 && live.parent.is_some());
        assert!(live.gate_candidate >= live.gate_live + GateConfig::default().margin);
        // A real improvement: the published file, loaded as a drafter worker would, accepts more of the
        // target's held-out distributions than the plain exit.
        let drafter = rig.target.truncated(1).unwrap();
        let (_, adapter) = rig.publisher.load_live(&drafter).await.unwrap().unwrap();
        let held: Vec<specd_engine::exit_train::ExitSample> = (500..510)
            .flat_map(|s| {
                let sample =
                    crate::buffer::validate(captured(&rig.target, s), "tiny", 1 << 20).unwrap();
                <ExitTrainer as Learner>::items(&drafter, &sample, PositionMask::All).unwrap()
            })
            .collect();
        let cfg = ExitConfig::default();
        let before = ExitTrainer::new(&drafter, cfg, 1)
            .unwrap()
            .expected_acceptance(&held)
            .unwrap();
        let after = <ExitTrainer as Learner>::resume(&drafter, &TrainConfig::default(), &adapter)
            .unwrap()
            .expected_acceptance(&held)
            .unwrap();
        assert!(after > before, "published {before} -> {after}");

        // Load appears: no step starts once the gate has seen it.
        rig.make_busy().await;
        // At most the step already under way finishes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frozen = rig.status().steps;
        for s in 80..160 {
            rig.svc.submit(captured(&rig.target, s));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            rig.status().steps,
            frozen,
            "trained while the cluster was busy"
        );
        assert!(rig.status().yielded > 0);
        rig.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_refuses_a_drafter_trained_on_shuffled_targets() {
        let mut rig = Rig::new().await;
        // Every 5th sample is held out: those are real traffic, the rest teach the wrong targets.
        for s in 0..120u64 {
            let sample = if s % 5 == 4 {
                captured(&rig.target, s)
            } else {
                shuffled(&rig.target, s)
            };
            assert!(rig.svc.submit(sample));
        }
        rig.start();
        rig.wait("not trained", |st| st.steps >= 25).await;
        let st = rig.status();
        assert!(
            st.acceptance_candidate < st.acceptance_live + GateConfig::default().margin,
            "{st:?}"
        );
        assert_eq!(st.publishes, 0, "{st:?}");
        assert!(rig.publisher.current().await.unwrap().is_none());
        rig.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_leader_resumes_from_the_live_version_and_a_regression_rolls_it_back() {
        let mut rig = Rig::new().await;
        for s in 0..80 {
            rig.svc.submit(captured(&rig.target, s));
        }
        rig.start();
        rig.wait("nothing published", |st| st.publishes >= 1).await;
        rig.svc.leader_flag().store(false, Ordering::Relaxed);
        let (live, _) = rig.publisher.current().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Leadership comes back (a standby taking over reads the same store): it resumes from the live
        // version, whose figures the gate now compares against.
        rig.svc.leader_flag().store(true, Ordering::Relaxed);
        rig.wait("did not resume", |st| st.live_version == live.version)
            .await;
        // The cluster gets busy (no more steps, so no more publishes); the live version is still
        // watched. Live traffic says it drafts far worse than its parent did.
        rig.make_busy().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (live, _) = rig.publisher.current().await.unwrap().unwrap();
        let counts = rig.svc.live_counts();
        let parent = live.parent.unwrap();
        counts.record(&parent.to_string(), 1000, 700);
        counts.record(&live.version.to_string(), 1000, 100);
        rig.wait("no rollback", |st| st.rollbacks >= 1).await;
        let (now, _) = rig.publisher.current().await.unwrap().unwrap();
        assert_eq!(now.version, parent);
        assert_eq!(now.rolled_back_from, Some(live.version));
        rig.wait("did not resume the restored version", |st| {
            st.live_version == parent
        })
        .await;
        rig.stop();
    }

    /// Kind `model`: the loop distills a separate draft model's LoRA adapters and publishes a version
    /// that, loaded as a drafter worker loads it, accepts more of the target's held-out distributions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loop_distills_a_draft_models_lora_and_publishes_it() {
        let mut rig = Rig::new().await;
        let path = rig._dir.path().join("draft.gguf");
        let mut spec = TinySpec::new(Family::Qwen2, 12);
        spec.layers = 2;
        spec.scale = 0.3;
        write_tiny_model(&path, &spec).unwrap();
        let drafter = load_gguf(&path).unwrap().model;
        rig.publisher.kind = "model".into();
        rig.publisher.layers = drafter.config().layers;
        let as_model = |mut s: pb::DistillSample| {
            s.drafter_kind = "model".into();
            s
        };
        for s in 0..60 {
            assert!(rig.svc.submit(as_model(captured(&rig.target, s))));
        }
        let cfg = TrainConfig {
            kind: "model".into(),
            lora: LoraConfig {
                rank: 4,
                lr: 3e-3,
                ..LoraConfig::default()
            },
            eval_every: 5,
            ..TrainConfig::default()
        };
        rig.start_with(drafter.clone(), cfg);
        rig.wait("nothing published", |st| st.publishes >= 1).await;
        let (live, weights) = rig.publisher.load_live(&drafter).await.unwrap().unwrap();
        assert_eq!(live.kind, "model");
        let TrainedWeights::Lora(lora) = &weights else {
            panic!("published {weights:?}, not LoRA adapters");
        };
        let held: Vec<specd_engine::lora_train::SeqSample> = (500..510)
            .flat_map(|s| {
                let sample =
                    crate::buffer::validate(as_model(captured(&rig.target, s)), "tiny", 1 << 20)
                        .unwrap();
                <LoraTrainer as Learner>::items(&drafter, &sample, PositionMask::All).unwrap()
            })
            .collect();
        let t = LoraTrainer::new(&drafter, LoraConfig::default(), 1).unwrap();
        let before = t.expected_acceptance_of(None, &held).unwrap();
        let after = t.expected_acceptance_of(Some(lora), &held).unwrap();
        assert!(after > before, "published {before} -> {after}");
        // What a drafter worker serves with it is the adapted draft model.
        assert!(weights.apply_to(&drafter).unwrap().lora().is_some());
        rig.stop();
    }
}
