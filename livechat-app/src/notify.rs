//! Mention notifications: the chat's side effect, and its exclusive durable handler.
//!
//! When a message mentions `@name`, the named person is notified once, by one process of the
//! cluster: [`MentionNotifier`] runs with [`Placement::Exclusive`] (the other processes stand
//! by and take over within the claim's bound if the active one dies), keeps its checkpoint in
//! the event store, and parks an event whose notification keeps failing
//! ([`ErrorPolicy::ParkAfter`]) so one broken delivery does not hold up the others. Operators
//! see parked events in the console (`/admin/handlers/mention-notifier/parked`) and retry or
//! discard them there.
//!
//! Delivery is at least once (a process that dies after delivering and before its checkpoint
//! moves delivers again after the takeover); each notification carries an idempotency key
//! (`{event id}:{name}`) so a receiver can drop the repeat. Where it goes is a [`Deliver`]:
//! the log (the default), or a webhook (`--mention-webhook URL`: a JSON `POST`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::{
    spawn_handler, Checkpoints, Envelope, ErrorPolicy, EventHandler, HandlerError, Placement, Progress, RunnerConfig,
    RunningHandler, StartFrom, Store,
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::domain::ChatEvent;

/// The notifier's handler name (its checkpoint and its claim).
pub const NOTIFIER_NAME: &str = "mention-notifier";

/// One person to tell that a message mentions them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// `{event id}:{name}`: the same for a redelivery, so a receiver can drop it.
    pub idempotency_key: String,
    /// The room.
    pub room: String,
    /// The message's number in the room.
    pub number: u64,
    /// Who wrote it.
    pub from: String,
    /// Who is mentioned.
    pub to: String,
    /// The message (at most 200 characters of it).
    pub excerpt: String,
    /// When it was sent, µs since the Unix epoch.
    pub sent_at: i64,
}

/// Why a notification was not delivered (the handler retries, then parks the event).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered, but not with success.
    #[error("the webhook answered {0}")]
    Status(u16),
    /// No answer: connection refused or reset, or too slow.
    #[error("the webhook could not be reached: {0}")]
    Unreachable(String),
    /// The receiver's URL is not one this client can call.
    #[error("invalid webhook URL {0:?}")]
    InvalidUrl(String),
}

/// Where notifications go.
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    /// Delivers one notification; an error is retried (the same notification, same key).
    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError>;
}

/// Notifications written to the log (target `livechat::mentions`), the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogDelivery;

#[async_trait]
impl Deliver for LogDelivery {
    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        tracing::info!(
            target: "livechat::mentions",
            room = %notification.room,
            number = notification.number,
            from = %notification.from,
            to = %notification.to,
            key = %notification.idempotency_key,
            "mention"
        );
        Ok(())
    }
}

/// Notifications `POST`ed as JSON to a URL (plain `http://`), with an `Idempotency-Key`
/// header, a 5 s timeout, and any 2xx answer taken as delivered.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    url: hyper::Uri,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl WebhookDelivery {
    /// How long one delivery may take.
    pub const TIMEOUT: Duration = Duration::from_secs(5);

    /// A webhook to `url` (`http://host:port/path`).
    pub fn new(url: &str) -> Result<Self, DeliveryError> {
        let uri: hyper::Uri = url.parse().map_err(|_| DeliveryError::InvalidUrl(url.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(DeliveryError::InvalidUrl(url.to_owned()));
        }
        Ok(Self { url: uri, client: Client::builder(TokioExecutor::new()).build_http() })
    }
}

#[async_trait]
impl Deliver for WebhookDelivery {
    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(notification).map_err(|e| DeliveryError::Unreachable(e.to_string()))?;
        let request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", &notification.idempotency_key)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| DeliveryError::InvalidUrl(self.url.to_string()))?;
        let answer = tokio::time::timeout(Self::TIMEOUT, async {
            let response = self.client.request(request).await.map_err(|e| DeliveryError::Unreachable(e.to_string()))?;
            let status = response.status();
            // Read the (small) answer so the connection can be reused.
            let _ = response.into_body().collect().await;
            Ok::<_, DeliveryError>(status)
        })
        .await
        .map_err(|_| DeliveryError::Unreachable(format!("no answer within {:?}", Self::TIMEOUT)))??;
        if answer.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(answer.as_u16()))
        }
    }
}

/// Which [`Deliver`] the app uses.
#[derive(Clone, Default)]
pub enum Notifications {
    /// [`LogDelivery`].
    #[default]
    Log,
    /// [`WebhookDelivery`] to this URL.
    Webhook(String),
    /// Any other.
    Custom(Arc<dyn Deliver>),
    /// No notifier runs in this process.
    Off,
}

impl fmt::Debug for Notifications {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notifications::Log => f.write_str("Log"),
            Notifications::Webhook(url) => f.debug_tuple("Webhook").field(url).finish(),
            Notifications::Custom(_) => f.write_str("Custom(..)"),
            Notifications::Off => f.write_str("Off"),
        }
    }
}

/// How the notifier runs.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Where notifications go.
    pub notifications: Notifications,
    /// Failed attempts at one event before it is parked.
    pub attempts_before_parking: u32,
    /// First retry delay (doubles up to 30 s).
    pub initial_backoff: Duration,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            notifications: Notifications::Log,
            attempts_before_parking: 5,
            initial_backoff: Duration::from_millis(200),
        }
    }
}

/// The handler: each `MessageSent` with mentions becomes one [`Notification`] per person.
pub struct MentionNotifier {
    deliver: Arc<dyn Deliver>,
    delivered: metrics::Counter,
}

impl MentionNotifier {
    /// A notifier delivering through `deliver`, counting deliveries on `delivered`.
    pub fn new(deliver: Arc<dyn Deliver>, delivered: metrics::Counter) -> Self {
        Self { deliver, delivered }
    }

    /// The notifications of one event (none for edits and deletes: an edit that adds a name
    /// does not notify).
    pub fn notifications(envelope: &Envelope<ChatEvent>) -> Vec<Notification> {
        let ChatEvent::MessageSent(sent) = &envelope.event else { return Vec::new() };
        let excerpt: String = sent.content.chars().take(200).collect();
        let mut names: Vec<&String> = sent.mentions.iter().filter(|name| **name != sent.sender).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|to| Notification {
                idempotency_key: format!("{}:{to}", envelope.event_id),
                room: sent.chat_id.to_string(),
                number: sent.number,
                from: sent.sender.clone(),
                to: to.clone(),
                excerpt: excerpt.clone(),
                sent_at: sent.sent_at.0,
            })
            .collect()
    }
}

impl EventHandler for MentionNotifier {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        NOTIFIER_NAME
    }

    async fn handle(&self, envelope: Envelope<ChatEvent>) -> Result<(), HandlerError> {
        // One event, several people: a retry delivers to all of them again (the key lets
        // receivers drop what they had), so a failure never loses the later ones.
        for notification in Self::notifications(&envelope) {
            self.deliver.deliver(&notification).await.map_err(HandlerError::new)?;
            self.delivered.increment(1);
        }
        Ok(())
    }
}

/// Starts the notifier for `config` (none with [`Notifications::Off`]): exclusive across the
/// processes sharing `store`, checkpointed in it, from the store's head the first time.
pub fn spawn_notifier(
    store: Arc<dyn Store>,
    config: &NotifierConfig,
    owner: &str,
    delivered: metrics::Counter,
    progress: &Progress,
) -> Result<Option<RunningHandler>, DeliveryError> {
    let deliver: Arc<dyn Deliver> = match &config.notifications {
        Notifications::Off => return Ok(None),
        Notifications::Log => Arc::new(LogDelivery),
        Notifications::Webhook(url) => Arc::new(WebhookDelivery::new(url)?),
        Notifications::Custom(deliver) => Arc::clone(deliver),
    };
    let runner = RunnerConfig {
        start_from: StartFrom::Current,
        checkpoints: Checkpoints::Store,
        placement: Placement::Exclusive,
        on_error: ErrorPolicy::ParkAfter { attempts: config.attempts_before_parking.max(1) },
        initial_backoff: config.initial_backoff,
        max_backoff: Duration::from_secs(30),
        owner: owner.to_owned(),
        ..RunnerConfig::default()
    };
    Ok(Some(spawn_handler(store, MentionNotifier::new(deliver, delivered), runner, progress)))
}

#[cfg(test)]
mod tests {
    use cqrs_core::{EventId, Metadata, Position, Timestamp, Version};

    use super::*;
    use crate::domain::{ChatId, MessageSent};

    fn envelope(sender: &str, mentions: &[&str]) -> Envelope<ChatEvent> {
        let chat_id = ChatId::parse("lounge").expect("room");
        Envelope {
            event_id: EventId(uuid::Uuid::nil()),
            stream_id: chat_id.stream_id(),
            version: Version(1),
            position: Position(1),
            recorded_at: Timestamp(1),
            event: ChatEvent::MessageSent(MessageSent {
                chat_id: chat_id.clone(),
                sender: sender.into(),
                content: "hi @bob and @carol".into(),
                sent_at: Timestamp(1),
                number: 7,
                mentions: mentions.iter().map(|m| (*m).to_owned()).collect(),
            }),
            metadata: Arc::new(Metadata::default()),
        }
    }

    #[test]
    fn each_mentioned_person_once_never_the_sender() {
        let notifications = MentionNotifier::notifications(&envelope("alice", &["carol", "bob", "alice", "bob"]));
        let to: Vec<&str> = notifications.iter().map(|n| n.to.as_str()).collect();
        assert_eq!(to, ["bob", "carol"]);
        assert_eq!(notifications[0].idempotency_key, format!("{}:bob", uuid::Uuid::nil()));
        assert_eq!((notifications[0].number, notifications[0].room.as_str()), (7, "lounge"));
        assert!(MentionNotifier::notifications(&envelope("alice", &[])).is_empty());
    }

    #[test]
    fn a_webhook_must_be_plain_http() {
        assert!(WebhookDelivery::new("http://127.0.0.1:9/hook").is_ok());
        assert!(matches!(WebhookDelivery::new("https://example.com/"), Err(DeliveryError::InvalidUrl(_))));
        assert!(matches!(WebhookDelivery::new("not a url"), Err(DeliveryError::InvalidUrl(_))));
    }
}
