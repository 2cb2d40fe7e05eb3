//! `sparkle enrollment`: the secrets workers on other machines enroll with. A worker
//! exchanges its enrollment secret for worker tokens (15 minutes each) on the worker
//! listener; revoking the enrollment stops its workers at their next renewal.

use super::{load_config, open_queue};
use crate::Common;
use anyhow::bail;
use clap::Subcommand;
use sparkle_queue::Scope;

#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    /// Create an enrollment. Its secret alone is printed on standard output, once (only its
    /// hash is stored): write it to the file `sparkle worker --enrollment-token-file` reads,
    /// readable by the worker's user alone.
    Create {
        #[command(flatten)]
        common: Common,
        /// A name to recognise the enrollment by (a machine, a pool).
        #[arg(long)]
        name: String,
    },
    /// List enrollments (never their secrets).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke an enrollment by id: its workers stop at their next token renewal.
    Revoke {
        #[command(flatten)]
        common: Common,
        id: String,
    },
}

pub async fn run(command: EnrollmentCommand) -> anyhow::Result<()> {
    match command {
        EnrollmentCommand::Create { common, name } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 100 {
                bail!("--name must be 1 to 100 characters");
            }
            let queue = open_queue(&load_config(&common, None)?).await?;
            let (key, secret) = queue.create_key(name, &[Scope::Worker]).await?;
            eprintln!(
                "Created enrollment {} ({}); its secret is shown once and only its hash is stored:",
                key.id, key.name
            );
            println!("{}", secret.expose());
        }
        EnrollmentCommand::List { common } => {
            let queue = open_queue(&load_config(&common, None)?).await?;
            for key in queue.list_keys().await? {
                if key.scopes.contains(&Scope::Worker) {
                    let state = if key.revoked { "revoked" } else { "active" };
                    println!("{}\t{}\t{state}", key.id, key.name);
                }
            }
        }
        EnrollmentCommand::Revoke { common, id } => {
            let queue = open_queue(&load_config(&common, None)?).await?;
            let is_enrollment = queue
                .list_keys()
                .await?
                .iter()
                .any(|k| k.id == id && k.scopes.contains(&Scope::Worker));
            if !is_enrollment || !queue.revoke_key(&id).await? {
                bail!("no active enrollment with id {id}");
            }
            eprintln!("Revoked enrollment {id}; its workers stop at their next token renewal");
        }
    }
    Ok(())
}
