//! An operator giving a device up for a rollout: the way out for a device that will never report again (taken
//! out of service, replaced, its state directory lost) and would otherwise hold its wave, the rollout's end and
//! its own place in any later rollout for ever.

use sea_orm::{ActiveModelTrait as _, ActiveValue::Set, EntityTrait as _, IntoActiveModel as _};
use uuid::Uuid;

use super::{Rollouts, action_of, action_state, note};
use crate::audit;
use crate::error::{Error, Result};
use crate::persistence::db::{self, now};
use crate::persistence::entity::{device, rollout_action};
use crate::persistence::events::Event;

/// The reason an abandoned action carries.
const ABANDONED: &str = "abandoned";

impl Rollouts {
    /// Ends `device`'s unfinished action in rollout `id` as canceled (`ActionState::abandon`), whatever state it
    /// is in. The RPC layer checked the caller's control over the device's place.
    pub async fn abandon(
        &self,
        ctx: &audit::Context,
        (id, device): (Uuid, Uuid),
        comment: &str,
    ) -> Result<rollout_action::Model> {
        let txn = db::begin_write(&self.db).await?;
        self.find(&txn, id).await?;
        let action = action_of(&txn, (id, device)).await?;
        let was = action_state(&action);
        let next = was.abandon().map_err(|_| {
            Error::FailedPrecondition(format!(
                "device {device} already finished in rollout {id} ({was}); there is nothing to abandon"
            ))
        })?;
        let at = now();
        let mut active = action.into_active_model();
        active.state = Set(next.as_str().to_owned());
        active.reason = Set(ABANDONED.to_owned());
        active.detail = Set(format!("abandoned by {} while {was}", ctx.actor));
        active.active_device = Set(None);
        active.updated_at = Set(at);
        let updated = active.update(&txn).await?;
        let scope = device::Entity::find_by_id(device).one(&txn).await?.map_or_else(
            || "*".to_owned(),
            |d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()),
        );
        let installing = if was.is_installing() {
            "; it was installing: check on the device which image it runs"
        } else {
            ""
        };
        ctx.record(
            &txn,
            "rollout.abandon_device",
            format!("device {device}"),
            scope,
            format!("rollout {id}: given up while {was}{installing}{}", note(comment)),
        )
        .await?;
        let event = Event::FirmwareDevice { device };
        self.events.announce(&txn, &event).await?;
        txn.commit().await?;
        self.events.emit(event);
        tracing::info!(%device, rollout = %id, from = %was, "device abandoned by an operator");
        Ok(updated)
    }
}
