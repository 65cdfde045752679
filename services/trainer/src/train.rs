//! The distillation loop: trains the self-drafter's exit adapter (`specd_engine::exit_train`) on the
//! samples the targets capture, while this trainer leads and the cluster is idle.
//!
//! It runs on a thread of its own (training is CPU work, not async work). Before every optimizer step
//! it checks leadership and the [`IdleGate`], so it yields within one step when load rises; a step is
//! one batch (64 positions by default: about 0.14 s for SmolLM2 on two cores). It trains on what is
//! new, in arrival order: each round takes the oldest samples not trained on yet (at most a few),
//! recomputes the drafter's exit states for their contexts with the engine's own kernels, and keeps the
//! positions the mask selects (OSD's default: where the target rejected the draft). Every
//! `eval_every` steps it measures the held-out expected acceptance of the plain exit and of the adapted
//! one, which `Status` reports.
//!
//! Not done here yet: publishing the adapter (weight store, version record, gate) and hot swap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use specd_core::PositionMask;
use specd_engine::exit_train::{ExitConfig, ExitSample, ExitTrainer};
use specd_engine::Model;
use specd_service::Shutdown;

use crate::buffer::{ReplayBuffer, Sample};
use crate::idle::IdleGate;
use crate::service::TrainingStatus;

/// How the loop trains.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The shelf (drafter kind) trained for.
    pub kind: String,
    pub exit: ExitConfig,
    pub mask: PositionMask,
    /// Positions per optimizer step.
    pub batch: usize,
    /// Steps between two held-out evaluations.
    pub eval_every: u64,
    /// Held-out positions evaluated, at most.
    pub eval_positions: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            kind: "self".into(),
            exit: ExitConfig::default(),
            mask: PositionMask::Rejected,
            batch: 64,
            eval_every: 20,
            eval_positions: 512,
        }
    }
}

/// Samples taken per round.
const ROUND: usize = 16;
/// Pause while there is nothing to do (not leading, busy, nothing new).
const PAUSE: Duration = Duration::from_millis(100);

/// What the loop shares with the service.
pub struct Shared {
    pub buffer: Arc<Mutex<ReplayBuffer>>,
    pub status: Arc<Mutex<TrainingStatus>>,
    pub leader: Arc<AtomicBool>,
}

/// The exit states and targets of a sample's positions that `mask` keeps.
fn exit_samples(
    drafter: &Model,
    sample: &Sample,
    mask: PositionMask,
) -> Result<Vec<ExitSample>, specd_engine::EngineError> {
    let kept: Vec<_> = sample
        .positions
        .iter()
        .filter(|p| mask.keeps(p.rejected))
        .collect();
    let Some(upto) = kept.iter().map(|p| p.prefix).max() else {
        return Ok(Vec::new());
    };
    let d = drafter.config().hidden;
    let hidden = drafter.final_hidden(&mut drafter.new_cache(), &sample.context[..upto])?;
    Ok(kept
        .into_iter()
        .map(|p| ExitSample {
            hidden: hidden[(p.prefix - 1) * d..p.prefix * d].to_vec(),
            target: p.target.clone(),
        })
        .collect())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the loop on its own thread; it ends when `stop` fires.
pub fn spawn(
    drafter: Model,
    cfg: TrainConfig,
    shared: Shared,
    gate: IdleGate,
    stop: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("specd-trainer".into())
        .spawn(move || {
            if let Err(e) = run(&drafter, &cfg, &shared, &gate, &stop) {
                tracing::error!(error = %e, "the training loop stopped");
            }
        })
}

fn run(
    drafter: &Model,
    cfg: &TrainConfig,
    shared: &Shared,
    gate: &IdleGate,
    stop: &Shutdown,
) -> Result<(), specd_engine::EngineError> {
    let mut trainer = ExitTrainer::new(drafter, cfg.exit, 1)?;
    // Never stepped: the exit as served today, for the held-out comparison.
    let base = ExitTrainer::new(drafter, cfg.exit, 1)?;
    let mut trained_upto = 0u64;
    let mut pending: Vec<ExitSample> = Vec::new();
    let batch = cfg.batch.max(1);
    while !stop.is_triggered() {
        if !shared.leader.load(Ordering::Relaxed) || !gate.may_train() {
            if !pending.is_empty() || gate.load().in_flight > 0 {
                lock(&shared.status).yielded += 1;
            }
            std::thread::sleep(PAUSE);
            continue;
        }
        if pending.len() < batch {
            // In arrival order, so that nothing between two rounds is skipped (what is too old has
            // been evicted already).
            let mut new = lock(&shared.buffer)
                .shelf(&cfg.kind)
                .map(|s| s.newer_than(trained_upto, usize::MAX))
                .unwrap_or_default();
            new.reverse();
            new.truncate(ROUND);
            if new.is_empty() {
                std::thread::sleep(PAUSE);
                continue;
            }
            trained_upto = new.iter().map(|s| s.seq).max().unwrap_or(trained_upto);
            for s in &new {
                pending.extend(exit_samples(drafter, s, cfg.mask)?);
            }
            continue;
        }
        let chunk: Vec<ExitSample> = pending.drain(..batch).collect();
        let t0 = std::time::Instant::now();
        let loss = trainer.step(&chunk)?;
        metrics::histogram!("specd_trainer_step_seconds").record(t0.elapsed().as_secs_f64());
        metrics::counter!("specd_trainer_steps_total").increment(1);
        let steps = {
            let mut st = lock(&shared.status);
            st.steps += 1;
            st.last_loss = loss;
            st.steps
        };
        metrics::gauge!("specd_trainer_loss").set(loss);
        if steps % cfg.eval_every.max(1) == 0 || steps == 1 {
            let held: Vec<Arc<Sample>> = lock(&shared.buffer)
                .shelf(&cfg.kind)
                .map(|s| s.held_out().cloned().collect())
                .unwrap_or_default();
            let mut eval = Vec::new();
            for s in &held {
                if eval.len() >= cfg.eval_positions {
                    break;
                }
                eval.extend(exit_samples(drafter, s, PositionMask::All)?);
            }
            eval.truncate(cfg.eval_positions);
            if !eval.is_empty() {
                let live = base.expected_acceptance(&eval)?;
                let candidate = trainer.expected_acceptance(&eval)?;
                let mut st = lock(&shared.status);
                st.acceptance_live = live;
                st.acceptance_candidate = candidate;
                tracing::info!(steps, loss, live, candidate, "held-out expected acceptance");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::buffer::BufferConfig;
    use crate::service::{TrainerConfig, TrainerService};
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loop_trains_on_captured_samples_while_idle_and_yields_when_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let mut spec = TinySpec::new(Family::Qwen2, 11);
        spec.layers = 4;
        spec.scale = 0.3;
        write_tiny_model(&path, &spec).unwrap();
        let target = load_gguf(&path).unwrap().model;
        let drafter = target.truncated(1).unwrap();
        let svc = TrainerService::new(TrainerConfig {
            model: "tiny".into(),
            vocab: target.config().vocab,
            buffer: BufferConfig {
                eval_every: 5,
                ..BufferConfig::default()
            },
        });
        svc.leader_flag().store(true, Ordering::Relaxed);
        for s in 0..80 {
            assert!(svc.submit(captured(&target, s)));
        }
        let store = Store::memory();
        let stop = Shutdown::new();
        let gate = IdleGate::follow(store.clone(), 0, stop.clone())
            .await
            .unwrap();
        let status = svc.training_handle();
        let cfg = TrainConfig {
            exit: ExitConfig {
                rank: 8,
                lr: 3e-3,
                ..ExitConfig::default()
            },
            eval_every: 5,
            ..TrainConfig::default()
        };
        let thread = spawn(
            drafter,
            cfg,
            Shared {
                buffer: svc.buffer_handle(),
                status: Arc::clone(&status),
                leader: svc.leader_flag(),
            },
            gate.clone(),
            stop.clone(),
        )
        .unwrap();
        let read = || lock(&status).clone();
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while read().steps < 15 {
            assert!(std::time::Instant::now() < end, "no training: {:?}", read());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = read();
        assert!(
            st.acceptance_candidate > st.acceptance_live,
            "held-out acceptance did not rise: {st:?}"
        );
        // Load appears: no step starts once the gate has seen it.
        store
            .put_record(
                &LoadReport {
                    router: "r".into(),
                    in_flight: 3,
                    queue: 0,
                    at: 0,
                },
                None,
            )
            .await
            .unwrap();
        while gate.may_train() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // At most the step already under way finishes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frozen = read().steps;
        for s in 80..160 {
            svc.submit(captured(&target, s));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(read().steps, frozen, "trained while the cluster was busy");
        assert!(read().yielded > 0);
        stop.trigger();
        thread.join().unwrap();
    }
}
