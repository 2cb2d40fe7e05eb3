//! The GPUs of this host, as `nvidia-smi` lists them, and which of them local workers use.
//!
//! Each local worker is pinned to one GPU with `CUDA_VISIBLE_DEVICES` (by the GPU's UUID, so
//! a renumbering cannot move it), where it sees its GPU as `cuda:0`. A host without
//! `nvidia-smi`, or where it lists nothing, runs its workers on the CPU.

use std::process::Command;

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
}

/// Which GPUs local workers may use (`scaler.gpus`, `--gpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuChoice {
    /// Every GPU found.
    All,
    /// None: workers on the CPU.
    None,
    /// These indexes, as `nvidia-smi` numbers them.
    Only(Vec<u32>),
}

impl std::str::FromStr for GpuChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<GpuChoice, String> {
        match text.trim() {
            "all" => Ok(GpuChoice::All),
            "none" | "cpu" => Ok(GpuChoice::None),
            list => {
                let mut indexes = Vec::new();
                for part in list.split(',') {
                    let index = part.trim().parse::<u32>().map_err(|_| {
                        format!("GPUs are `all`, `none` or indexes like `0,2`; got {text:?}")
                    })?;
                    if !indexes.contains(&index) {
                        indexes.push(index);
                    }
                }
                Ok(GpuChoice::Only(indexes))
            }
        }
    }
}

/// Reads `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(text: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, uuid, name, memory] = fields.as_slice() else {
            return Err(format!(
                "line {}: expected index, uuid, name, memory",
                n + 1
            ));
        };
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        if !uuid.starts_with("GPU-") || uuid.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("not a GPU UUID"));
        }
        gpus.push(Gpu {
            index: index.parse().map_err(|_| bad("not an index"))?,
            uuid: uuid.to_string(),
            name: name.to_string(),
            memory_mib: memory.parse().map_err(|_| bad("not a memory size"))?,
        });
    }
    Ok(gpus)
}

/// The GPUs `program` (normally `nvidia-smi`) lists; none when it is missing or fails.
pub fn discover(program: &str) -> Vec<Gpu> {
    let out = Command::new(program)
        .args([
            "--query-gpu=index,uuid,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            match parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)) {
                Ok(gpus) => gpus,
                Err(why) => {
                    tracing::warn!(program, error = %why, "could not read the GPUs; running on the CPU");
                    Vec::new()
                }
            }
        }
        Ok(out) => {
            tracing::info!(program, status = %out.status, "no GPUs listed; running on the CPU");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// The GPUs chosen among those found; an index asked for that is not there is an error.
pub fn choose(found: &[Gpu], choice: &GpuChoice) -> Result<Vec<Gpu>, String> {
    match choice {
        GpuChoice::All => Ok(found.to_vec()),
        GpuChoice::None => Ok(Vec::new()),
        GpuChoice::Only(indexes) => indexes
            .iter()
            .map(|i| {
                found
                    .iter()
                    .find(|g| g.index == *i)
                    .cloned()
                    .ok_or_else(|| {
                        let there: Vec<String> =
                            found.iter().map(|g| g.index.to_string()).collect();
                        format!(
                            "GPU {i} is not on this host (nvidia-smi lists: {})",
                            if there.is_empty() {
                                "none".to_string()
                            } else {
                                there.join(", ")
                            }
                        )
                    })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "0, GPU-1a2b3c4d-0000-1111-2222-333344445555, NVIDIA H200, 143771\n\
                       1, GPU-9f8e7d6c-0000-1111-2222-333344445555, NVIDIA H200, 143771\n";

    #[test]
    fn nvidia_smi_output_is_read_and_nonsense_refused() {
        let gpus = parse_nvidia_smi(TWO).expect("two GPUs");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].name, "NVIDIA H200");
        assert_eq!(gpus[0].memory_mib, 143771);
        assert!(parse_nvidia_smi("").expect("none").is_empty());
        assert!(parse_nvidia_smi("0, not-a-uuid, X, 1").is_err());
        assert!(parse_nvidia_smi("zero, GPU-1, X, 1").is_err());
    }

    #[test]
    fn a_choice_names_gpus_that_are_there() {
        let gpus = parse_nvidia_smi(TWO).expect("two GPUs");
        assert_eq!(
            choose(&gpus, &"all".parse().expect("all"))
                .expect("ok")
                .len(),
            2
        );
        assert!(choose(&gpus, &"none".parse().expect("none"))
            .expect("ok")
            .is_empty());
        let one = choose(&gpus, &"1".parse().expect("one")).expect("ok");
        assert_eq!(one[0].uuid, gpus[1].uuid);
        let err = choose(&gpus, &"0,3".parse().expect("list")).expect_err("3 is not there");
        assert!(err.contains("GPU 3") && err.contains("0, 1"), "{err}");
        assert!("0,x".parse::<GpuChoice>().is_err());
    }

    #[test]
    fn a_missing_nvidia_smi_means_the_cpu() {
        assert!(discover("/nonexistent/nvidia-smi").is_empty());
    }
}
