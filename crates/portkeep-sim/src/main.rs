//! `portkeep-sim`: runs seeds of the deterministic simulator.
//!
//! ```text
//! portkeep-sim --seeds 1000            # seeds 0..1000, summary
//! portkeep-sim --seed 42               # replay one seed with its trace
//! portkeep-sim --seeds 200 --enable promote-empty
//! portkeep-sim --seeds 1000 --planted release-before-ack
//! portkeep-sim --seeds 2000 --witness  # etcd decides who serves; freezes
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use portkeep_sim::{run, run_seeds, Options, PlantedBug, Schedule};

/// Deterministic simulation of Portkeep clients and an active/backup pair.
#[derive(Debug, Parser)]
#[command(name = "portkeep-sim")]
struct Args {
    /// Run this many seeds (from --first).
    #[arg(long, value_name = "N", conflicts_with = "seed")]
    seeds: Option<u64>,
    /// First seed of --seeds.
    #[arg(long, value_name = "S", default_value_t = 0)]
    first: u64,
    /// Replay one seed and print its trace.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Turn on a named schedule (promote-empty,
    /// partitioned-old-active, frozen-old-active, etcd-slow with
    /// --witness, dataplane-refusal); repeatable.
    #[arg(long, value_name = "NAME")]
    enable: Vec<String>,
    /// Switch on a planted defect (release-before-ack, skip-term-check,
    /// ack-before-persist, refused-kept-removes, refused-lost-keeps-epoch).
    #[arg(long, value_name = "NAME")]
    planted: Option<String>,
    /// Virtual minutes per seed.
    #[arg(long, value_name = "MIN", default_value_t = 10)]
    minutes: u64,
    /// Worker threads for --seeds.
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Witness mode: a modelled etcd decides which node serves (the
    /// coordinator's logic on each node), nodes' processes freeze, and
    /// invariant 6 holds at most one node answering at any instant.
    #[arg(long)]
    witness: bool,
    /// Witness mode with the fence off (a planted defect: a node answers
    /// whatever its lease says).
    #[arg(long, requires = "witness")]
    no_fence: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut template = Options::new(0);
    template.duration_ms = args.minutes * 60_000;
    template.witness = args.witness;
    template.witness_fence = !args.no_fence;
    for e in &args.enable {
        match Schedule::parse(e) {
            Some(s) => template.enable.push(s),
            None => {
                eprintln!(
                    "unknown schedule {e:?}: expected one of promote-empty, partitioned-old-active, frozen-old-active, etcd-slow, dataplane-refusal"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(p) = &args.planted {
        match PlantedBug::parse(p) {
            Some(b) => template.planted = Some(b),
            None => {
                let names: Vec<&str> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
                eprintln!(
                    "unknown planted defect {p:?}: expected one of {}",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    let mode = format!(
        "{}{}",
        if template.witness { " --witness" } else { "" },
        if template.witness && !template.witness_fence {
            " --no-fence"
        } else {
            ""
        }
    );
    if let Some(seed) = args.seed {
        let mut o = template;
        o.seed = seed;
        o.trace = true;
        let r = run(&o);
        for line in &r.trace {
            println!("{line}");
        }
        println!("faults by kind:");
        for (k, n) in &r.faults {
            println!("  {k:<32} {n}");
        }
        println!(
            "check-points promised {}, takeovers {}, resumes {}, handovers {}, steps {}",
            r.checkpoints_promised, r.takeovers, r.resumes, r.handovers, r.steps
        );
        println!(
            "not violations: check-points ended by an answer the client never received {}",
            r.unseen_downgrades
        );
        println!(
            "dataplane refusals: kept {}, not installed {}, lost {}",
            r.refused_kept, r.refused_not_installed, r.refused_lost
        );
        if o.witness {
            println!(
                "witness: elections {}, yields {}, stand-downs {}",
                r.elections, r.yields, r.stand_downs
            );
        }
        for v in &r.violations {
            println!("{v}");
        }
        println!("1 seeds, {} invariant violations", r.violation_count);
        return if r.violation_count == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let n = args.seeds.unwrap_or(100);
    let threads = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    #[allow(clippy::disallowed_methods)] // Wall time of the run, for the summary.
    let started = Instant::now();
    let t = run_seeds(&template, args.first, n, threads);
    let took = started.elapsed();
    println!(
        "faults by kind (at least {} in every seed):",
        t.min_faults_per_seed
    );
    for (k, c) in &t.faults {
        println!("  {k:<32} {c}");
    }
    println!(
        "check-points promised {}, takeovers {}, resumes {}, handovers {}, steps {}",
        t.checkpoints_promised, t.takeovers, t.resumes, t.handovers, t.steps
    );
    println!(
        "not violations: check-points ended by an answer the client never received {}",
        t.unseen_downgrades
    );
    println!(
        "volatile extensions answered without waiting for the backup {}",
        t.extensions_unawaited
    );
    println!(
        "dataplane refusals: kept {}, not installed {}, lost {}",
        t.refused_kept, t.refused_not_installed, t.refused_lost
    );
    if template.witness {
        println!(
            "witness: elections {}, yields {}, stand-downs {}",
            t.elections, t.yields, t.stand_downs
        );
    }
    println!(
        "wall time {:.1} s on {threads} thread(s)",
        took.as_secs_f64()
    );
    for v in &t.examples {
        println!("{v}");
        println!(
            "  replay: cargo run --release -p portkeep-sim -- --seed {}{mode}{}{}",
            v.seed,
            template
                .enable
                .iter()
                .map(|s| format!(" --enable {}", s.name()))
                .collect::<String>(),
            template
                .planted
                .map(|p| format!(" --planted {}", p.name()))
                .unwrap_or_default()
        );
    }
    println!("{} seeds, {} invariant violations", t.seeds, t.violations);
    if t.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
