//! Prints, per weight format and shape of a model, the time of one matmul over m = 1..64 activation rows
//! (fastest of the repetitions: the machines are noisy) and the multiply rate m rows reach: where a
//! verify step's extra rows and a prefill chunk go. Layer 0's matrices stay in cache between repetitions,
//! so this measures the kernels' arithmetic, not the memory stream (`specd bench-kernels` does that).
//! Usage: matmul_rows MODEL.gguf
use std::time::Instant;

use specd_engine::load_gguf;

const ROWS: [usize; 7] = [1, 2, 4, 5, 8, 9, 64];

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
        println!("  {:>6.0} {:>6.0}", gmacs(4), gmacs(6));
    }
    Ok(())
}
