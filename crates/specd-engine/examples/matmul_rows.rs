//! Prints, per weight format and shape of a model, the time of one matmul over m = 1..64 activation rows
//! (fastest of the repetitions: the machines are noisy) and the multiply rate m rows reach: where a
//! verify step's extra rows and a prefill chunk go. Layer 0's matrices stay in cache between repetitions,
//! so this measures the kernels' arithmetic, not the memory stream (`specd bench-kernels` does that).
//! Usage: matmul_rows MODEL.gguf
use std::time::Instant;

use specd_engine::load_gguf;

const ROWS: [usize; 9] = [1, 2, 4, 5, 6, 7, 8, 9, 64];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: matmul_rows MODEL.gguf")?;
    let loaded = load_gguf(std::path::Path::new(&path))?;
    let w = loaded.model.weights();
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let named = w.layers[0].matrices().into_iter().chain([("head", head)]);
    print!("weight  format  n x k          m=1 ms");
    for m in &ROWS[1..] {
        print!(" {:>6}", format!("m={m} x"));
    }
    println!("  GMAC/s at m=8, m=64");
    for (name, q) in named {
        let k = q.cols();
        let mut times = Vec::new();
        for m in ROWS {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let reps = if name == "head" { 3 } else { 30.max(600 / m) };
            q.matmul(&x, m);
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                std::hint::black_box(q.matmul(&x, m));
                best = best.min(t.elapsed().as_secs_f64() * 1000.0);
            }
            times.push(best);
        }
        print!(
            "{name:<7} {:<7} {:>6} x {:<6} {:>7.3}",
            q.dtype_name(),
            q.rows(),
            k,
            times[0]
        );
        for t in &times[1..] {
            print!(" {:>6.2}", t / times[0]);
        }
        let gmacs = |i: usize| (ROWS[i] * q.rows() * k) as f64 / (times[i] * 1e6);
        println!("  {:>6.0} {:>6.0}", gmacs(6), gmacs(8));
    }
    stream(w);
    Ok(())
}

/// Every layer's matrices in forward order, so the weights come from memory as in a forward (no
/// attention, norms or head): how much of the extra rows' arithmetic hides under the weight stream.
fn stream(w: &specd_engine::model::Weights) {
    let mats: Vec<&specd_engine::qweight::QWeight> = w
        .layers
        .iter()
        .flat_map(|l| l.matrices().map(|(_, q)| q))
        .collect();
    let bytes: usize = mats.iter().map(|q| q.nbytes()).sum();
    let macs: usize = mats.iter().map(|q| q.rows() * q.cols()).sum();
    let inputs: Vec<Vec<f32>> = ROWS
        .iter()
        .map(|&m| {
            let k = mats.iter().map(|q| q.cols()).max().unwrap_or(0);
            (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect()
        })
        .collect();
    let pass = |i: usize| {
        let t = Instant::now();
        for q in &mats {
            std::hint::black_box(q.matmul(&inputs[i][..ROWS[i] * q.cols()], ROWS[i]));
        }
        t.elapsed().as_secs_f64() * 1000.0
    };
    println!(
        "layers from memory: {} MB, {:.2} GMAC per row",
        bytes / 1_000_000,
        macs as f64 / 1e9
    );
    println!("    m        ms  x m=1   GB/s  GMAC/s");
    let mut one = 0.0;
    for (i, m) in ROWS.iter().enumerate() {
        let best = (0..5).map(|_| pass(i)).fold(f64::INFINITY, f64::min);
        if i == 0 {
            one = best;
        }
        println!(
            "{m:>5} {best:>9.2} {:>6.2} {:>6.1} {:>7.0}",
            best / one,
            bytes as f64 / (best * 1e6),
            (m * macs) as f64 / (best * 1e6)
        );
    }
}
