//! Claims, parked events, process manager state and scheduled commands, kept in the same
//! state as the log, behind the same lock.

use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::{Coordination, StoreError};
use cqrs_core::{
    Claim, ClaimOutcome, CommandId, ParkedEvent, ParkedStatus, Position, ProcessInstance, ProcessState, Scheduled,
    SetAsideCommand, Timestamp,
};

use crate::MemoryStore;

#[async_trait]
impl Coordination for MemoryStore {
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        let now = Timestamp::now();
        let mut state = self.write();
        let token = match state.claims.get(name) {
            Some(current) if current.expires_at > now && current.owner != owner => {
                return Ok(ClaimOutcome::Taken { holder: current.owner.clone(), until: current.expires_at });
            }
            Some(current) if current.expires_at > now => current.token,
            Some(lapsed) => lapsed.token + 1,
            None => 1,
        };
        let claim = Claim { name: name.to_owned(), owner: owner.to_owned(), token, expires_at: now.plus(ttl) };
        state.claims.insert(name.to_owned(), claim.clone());
        Ok(ClaimOutcome::Held(claim))
    }

    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        let mut state = self.write();
        if state.holds(claim) {
            if let Some(current) = state.claims.get_mut(&claim.name) {
                current.expires_at = Timestamp::now();
            }
        }
        Ok(())
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        let now = Timestamp::now();
        let mut claims: Vec<Claim> = self.read().claims.values().filter(|c| c.expires_at > now).cloned().collect();
        claims.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(claims)
    }

    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        let mut state = self.write();
        if !state.holds(claim) {
            return Err(StoreError::ClaimLost { name: claim.name.clone() });
        }
        state.checkpoints.insert(name.to_owned(), position);
        Ok(())
    }

    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        let mut state = self.write();
        state.fenced(fence)?;
        state.parked.entry(event.handler.clone()).or_default().insert(event.position, event);
        Ok(())
    }

    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        Ok(self.read().parked.get(handler).map(|parked| parked.values().cloned().collect()).unwrap_or_default())
    }

    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        let mut state = self.write();
        state.fenced(fence)?;
        let parked = state.parked.get_mut(handler).and_then(|parked| parked.get_mut(&position));
        Ok(parked.map(|parked| parked.status = status).is_some())
    }

    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        let mut state = self.write();
        state.fenced(fence)?;
        let parked = state.parked.get_mut(handler).and_then(|parked| parked.get_mut(&position));
        Ok(parked
            .map(|parked| {
                parked.error = error.to_owned();
                parked.attempts = parked.attempts.saturating_add(1);
                parked.status = ParkedStatus::Parked;
            })
            .is_some())
    }

    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
        let mut state = self.write();
        state.fenced(fence)?;
        Ok(state.parked.get_mut(handler).and_then(|parked| parked.remove(&position)).is_some())
    }

    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
        Ok(self.read().processes.get(&(process.to_owned(), key.to_owned())).cloned())
    }

    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError> {
        let mut stored = self.write();
        if let Some(claim) = fence {
            if !stored.holds(claim) {
                return Err(StoreError::ClaimLost { name: claim.name.clone() });
            }
        }
        let id = (process.to_owned(), key.to_owned());
        match state {
            Some(state) => stored.processes.insert(id, state.clone()),
            None => stored.processes.remove(&id),
        };
        Ok(())
    }

    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        let stored = self.read();
        let mut instances: Vec<ProcessInstance> = stored
            .processes
            .iter()
            .filter(|((owner, key), _)| owner == process && after.is_none_or(|after| key.as_str() > after))
            .map(|((_, key), state)| ProcessInstance { key: key.clone(), state: state.clone() })
            .collect();
        instances.sort_by(|a, b| a.key.cmp(&b.key));
        instances.truncate(max);
        Ok(instances)
    }

    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError> {
        let mut stored = self.write();
        let before = stored.processes.len();
        stored.processes.retain(|(owner, _), state| owner != process || !state.ended || state.position > position);
        Ok((before - stored.processes.len()) as u64)
    }

    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError> {
        let id = (scheduled.owner.clone(), scheduled.key.clone(), scheduled.name.clone());
        let mut state = self.write();
        state.set_aside.remove(&id);
        state.scheduled.insert(id, Scheduled { attempts: 0, ..scheduled });
        Ok(())
    }

    async fn unschedule(
        &self,
        owner: &str,
        key: &str,
        name: &str,
        only: Option<CommandId>,
    ) -> Result<bool, StoreError> {
        let mut state = self.write();
        let id = (owner.to_owned(), key.to_owned(), name.to_owned());
        let matches = state.scheduled.get(&id).is_some_and(|s| only.is_none_or(|only| s.command_id == only));
        if matches {
            state.set_aside.remove(&id);
        }
        Ok(matches && state.scheduled.remove(&id).is_some())
    }

    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
        let state = self.read();
        let mut due: Vec<Scheduled> = state
            .scheduled
            .iter()
            .filter(|(id, s)| s.owner == owner && s.due <= now && !state.set_aside.contains_key(*id))
            .map(|(_, s)| s.clone())
            .collect();
        due.sort_by(|a, b| (a.due, &a.key, &a.name).cmp(&(b.due, &b.key, &b.name)));
        due.truncate(max);
        Ok(due)
    }

    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        let mut state = self.write();
        let id = (scheduled.owner.clone(), scheduled.key.clone(), scheduled.name.clone());
        let Some(stored) = state.scheduled.get_mut(&id).filter(|s| s.command_id == scheduled.command_id) else {
            return Ok(false);
        };
        stored.attempts += 1;
        match retry_at {
            Some(retry_at) => stored.due = retry_at,
            None => {
                state.set_aside.insert(id, error.to_owned());
            }
        }
        Ok(true)
    }

    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        let state = self.read();
        let mut set_aside: Vec<SetAsideCommand> = state
            .set_aside
            .iter()
            .filter(|((aside_owner, _, _), _)| aside_owner == owner)
            .filter_map(|(id, error)| {
                let scheduled = state.scheduled.get(id)?.clone();
                Some(SetAsideCommand { scheduled, error: error.clone() })
            })
            .collect();
        set_aside.sort_by(|a, b| (&a.scheduled.key, &a.scheduled.name).cmp(&(&b.scheduled.key, &b.scheduled.name)));
        Ok(set_aside)
    }

    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        let mut state = self.write();
        let id = (owner.to_owned(), key.to_owned(), name.to_owned());
        if state.set_aside.remove(&id).is_none() {
            return Ok(false);
        }
        if let Some(stored) = state.scheduled.get_mut(&id) {
            stored.attempts = 0;
        }
        Ok(true)
    }
}
