use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A sampler (diffusers calls them schedulers): how the denoising loop steps from noise to image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Euler,
    EulerA,
    Ddim,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
}

impl Scheduler {
    pub const ALL: [Scheduler; 4] = [
        Scheduler::Euler,
        Scheduler::EulerA,
        Scheduler::Ddim,
        Scheduler::DpmPp2mKarras,
    ];

    /// The name used in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Euler => "euler",
            Scheduler::EulerA => "euler_a",
            Scheduler::Ddim => "ddim",
            Scheduler::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The name the popular web UIs write in a PNG's `parameters` chunk.
    pub fn display_name(self) -> &'static str {
        match self {
            Scheduler::Euler => "Euler",
            Scheduler::EulerA => "Euler a",
            Scheduler::Ddim => "DDIM",
            Scheduler::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Scheduler::ALL
            .into_iter()
            .find(|k| k.as_str() == wanted || k.display_name().to_ascii_lowercase() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Scheduler::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown scheduler {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}
