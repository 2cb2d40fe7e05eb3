//! Browser sessions: a key's stand-in that ends at its expiry, at sign-out, or with its key.

use super::T0;
use crate::{ApiKeys, ManualClock, Scope, MAX_SESSIONS_PER_KEY};

pub(super) async fn a_session_acts_as_its_key_until_it_ends<Q: ApiKeys>(q: Q, c: ManualClock) {
    let (key, _) = q.create_key("web", &[Scope::Generate]).await.expect("key");
    let secret = q
        .open_session(&key.id, T0 + 1000)
        .await
        .expect("open")
        .expect("a live key opens a session");
    let session = q
        .session(secret.expose())
        .await
        .expect("look")
        .expect("open now");
    assert_eq!(
        (session.key.id.as_str(), session.expires_at_ms),
        (key.id.as_str(), T0 + 1000)
    );
    assert!(session.key.allows(Scope::Generate) && !session.key.allows(Scope::Admin));
    c.advance_ms(999);
    assert!(q.session(secret.expose()).await.expect("look").is_some());
    c.advance_ms(1);
    assert!(
        q.session(secret.expose()).await.expect("look").is_none(),
        "ended at its expiry"
    );

    let secret = q
        .open_session(&key.id, T0 + 60_000)
        .await
        .expect("open")
        .expect("live");
    assert!(q.end_session(secret.expose()).await.expect("end"));
    assert!(q.session(secret.expose()).await.expect("look").is_none());
    assert!(!q.end_session(secret.expose()).await.expect("end twice"));
    for bogus in ["", "sps_", "sps_00", "spk_00", &secret.expose()[..20]] {
        assert!(q.session(bogus).await.expect("look").is_none(), "{bogus:?}");
        assert!(!q.end_session(bogus).await.expect("end"), "{bogus:?}");
    }
}

pub(super) async fn a_revoked_key_ends_its_sessions_and_opens_none<Q: ApiKeys>(
    q: Q,
    _c: ManualClock,
) {
    let (key, _) = q.create_key("web", &[Scope::Read]).await.expect("key");
    let secret = q
        .open_session(&key.id, T0 + 60_000)
        .await
        .expect("open")
        .expect("live");
    assert!(q.revoke_key(&key.id).await.expect("revoke"));
    assert!(q.session(secret.expose()).await.expect("look").is_none());
    assert!(q
        .open_session(&key.id, T0 + 60_000)
        .await
        .expect("open")
        .is_none());
    assert!(q
        .open_session("key_nobody", T0 + 60_000)
        .await
        .expect("open")
        .is_none());
}

pub(super) async fn a_key_keeps_its_newest_sessions_only<Q: ApiKeys>(q: Q, c: ManualClock) {
    let (key, _) = q.create_key("web", &[Scope::Read]).await.expect("key");
    let (other, _) = q.create_key("other", &[Scope::Read]).await.expect("key");
    let theirs = q
        .open_session(&other.id, T0 + 60_000)
        .await
        .expect("open")
        .expect("live");
    let mut secrets = Vec::new();
    for _ in 0..=MAX_SESSIONS_PER_KEY {
        secrets.push(
            q.open_session(&key.id, T0 + 60_000)
                .await
                .expect("open")
                .expect("live"),
        );
        c.advance_ms(1);
    }
    let mut open = Vec::new();
    for secret in &secrets {
        open.push(q.session(secret.expose()).await.expect("look").is_some());
    }
    assert!(!open[0], "the oldest ended");
    assert!(
        open[1..].iter().all(|o| *o),
        "the newest {MAX_SESSIONS_PER_KEY} stay"
    );
    assert!(
        q.session(theirs.expose()).await.expect("look").is_some(),
        "another key's sessions are not counted"
    );
}
