use super::{load_config, open_queue};
use crate::Common;
use anyhow::bail;
use clap::Subcommand;
use sparkle_delivery::webhook::WebhookSecret;
use sparkle_queue::Scope;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key. The key is printed once; only its hash is stored.
    Create {
        #[command(flatten)]
        common: Common,
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: generate, read, admin.
        #[arg(long, default_value = "generate,read", value_delimiter = ',')]
        scope: Vec<String>,
    },
    /// List API keys (never their secrets).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke an API key by id.
    Revoke {
        #[command(flatten)]
        common: Common,
        id: String,
    },
    /// Give a key a new webhook signing secret (`whsec_…`), printed once. The secret it
    /// replaces keeps signing beside it for `webhooks.rotation_grace_hours` (or --grace-hours),
    /// so receivers can switch over without missing a webhook.
    RotateWebhookSecret {
        #[command(flatten)]
        common: Common,
        id: String,
        /// Hours the old secret still signs; 0 ends it at once.
        #[arg(long)]
        grace_hours: Option<u64>,
    },
}

pub async fn run(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            common,
            name,
            scope,
        } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 100 {
                bail!("--name must be 1 to 100 characters");
            }
            let scopes = scope
                .iter()
                .map(|s| {
                    Scope::parse(s).ok_or_else(|| {
                        anyhow::anyhow!("unknown scope {s:?}; expected generate, read or admin")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if scopes.contains(&Scope::Worker) {
                bail!("workers enroll with `sparkle enrollment create`, not with an API key");
            }
            let queue = open_queue(&load_config(&common, None)?).await?;
            let (key, secret) = queue.create_key(name, &scopes).await?;
            let webhook_secret = WebhookSecret::generate();
            queue
                .set_webhook_secret(&key.id, webhook_secret.as_bytes(), Duration::ZERO)
                .await?;
            eprintln!(
                "Created key {} ({}); it is shown once and only its hash is stored:",
                key.id, key.name
            );
            println!("{}", secret.expose());
            eprintln!(
                "Its webhook signing secret (shown once; `sparkle key rotate-webhook-secret {}` makes a new one):\n{}",
                key.id,
                webhook_secret.expose().as_str()
            );
        }
        KeyCommand::List { common } => {
            let queue = open_queue(&load_config(&common, None)?).await?;
            // Enrollments are listed by `sparkle enrollment list`.
            for key in queue.list_keys().await? {
                if key.scopes.contains(&Scope::Worker) {
                    continue;
                }
                let scopes: Vec<_> = key.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "{}\t{}\t{}\t{}",
                    key.id,
                    key.name,
                    scopes.join(","),
                    if key.revoked { "revoked" } else { "active" }
                );
            }
        }
        KeyCommand::Revoke { common, id } => {
            let queue = open_queue(&load_config(&common, None)?).await?;
            if !queue.revoke_key(&id).await? {
                bail!("no active key with id {id}");
            }
            eprintln!("Revoked {id}");
        }
        KeyCommand::RotateWebhookSecret {
            common,
            id,
            grace_hours,
        } => {
            let config = load_config(&common, None)?;
            let grace = grace_hours.unwrap_or(config.webhooks.rotation_grace_hours);
            if grace > 24 * 30 {
                bail!("--grace-hours may be at most 720 (30 days)");
            }
            let queue = open_queue(&config).await?;
            let secret = WebhookSecret::generate();
            if !queue
                .set_webhook_secret(&id, secret.as_bytes(), Duration::from_secs(grace * 3600))
                .await?
            {
                bail!("no active key with id {id}");
            }
            eprintln!(
                "New webhook signing secret for {id} (shown once); the previous one signs beside it for {grace} hours:"
            );
            println!("{}", secret.expose().as_str());
        }
    }
    Ok(())
}
