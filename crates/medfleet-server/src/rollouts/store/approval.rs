//! A clinician's approval to install on a device in clinical use: given for a bounded time and for the patient
//! association the device has at that moment (`medfleet_core::firmware::rollout::Approval` decides whether it
//! still stands when the device would install).

use std::time::Duration;

use medfleet_core::firmware::rollout::ClinicalUse;
use sea_orm::{ActiveModelTrait as _, ActiveValue::Set, EntityTrait as _, IntoActiveModel as _};
use uuid::Uuid;

use super::{Rollouts, action_of, action_state, clinical_use_of, note};
use crate::audit;
use crate::error::{Error, Result};
use crate::persistence::db::{self, now};
use crate::persistence::entity::{device, rollout_action};
use crate::persistence::events::Event;

impl Rollouts {
    /// A clinician's approval to install on a device in clinical use, for `valid_for` and for the patient it is
    /// bound to now (`Approval::holds`).
    pub async fn approve(
        &self,
        ctx: &audit::Context,
        (id, device): (Uuid, Uuid),
        valid_for: Duration,
        comment: &str,
    ) -> Result<rollout_action::Model> {
        let txn = db::begin_write(&self.db).await?;
        let row = self.find(&txn, id).await?;
        if clinical_use_of(&row.clinical_use) != ClinicalUse::Approve {
            return Err(Error::FailedPrecondition(format!(
                "rollout {id} defers devices in clinical use until they are free; approval applies only to rollouts \
                 created with --clinical-use approve"
            )));
        }
        let action = action_of(&txn, (id, device)).await?;
        let state = action_state(&action);
        if state.is_final() || state.is_installing() {
            return Err(Error::FailedPrecondition(format!(
                "device {device} is {state} in rollout {id}: nothing to approve"
            )));
        }
        let at = now();
        let open = crate::rollouts::dispatch::open_associations(&txn, &[device], at).await?;
        let association = match open.get(&device).map(Vec::as_slice) {
            None | Some([]) => None,
            Some([one]) => Some(*one),
            Some(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "device {device} is associated with more than one patient now; end the wrong association \
                     before approving an install"
                )));
            }
        };
        let until = chrono::Duration::from_std(valid_for)
            .ok()
            .and_then(|d| at.checked_add_signed(d))
            .ok_or_else(|| Error::Internal("approval expiry out of range".into()))?;
        let mut active = action.into_active_model();
        active.approved_by = Set(ctx.actor.clone());
        active.approved_until = Set(Some(until));
        active.approved_association = Set(association);
        active.updated_at = Set(at);
        let updated = active.update(&txn).await?;
        let scope = device::Entity::find_by_id(device).one(&txn).await?.map_or_else(
            || "*".to_owned(),
            |d| audit::device_scope(d.site.as_deref(), d.ward.as_deref()),
        );
        ctx.record(
            &txn,
            "rollout.approve_device",
            format!("device {device}"),
            scope,
            format!(
                "rollout {id}: install approved while in clinical use until {}{}{}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                if association.is_some() {
                    ", for the patient bound now"
                } else {
                    ", while no patient is bound"
                },
                note(comment)
            ),
        )
        .await?;
        self.events.announce(&txn, &Event::Firmware).await?;
        txn.commit().await?;
        self.events.emit(Event::Firmware);
        Ok(updated)
    }
}
