//! The gRPC feed's store side: subscriptions of an EMR system to a feed destination, the cursor each keeps in
//! the database (so a feed resumes where its reader acknowledged, on any replica), and pages of chart events
//! after a cursor.

use std::collections::BTreeSet;

use medfleet_core::validation::Violations;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use uuid::Uuid;

use crate::clinical::DestinationKind;
use crate::error::{Error, Result};
use crate::persistence::db::now;
use crate::persistence::entity::{emr_destination, emr_outbox, feed_subscription, observation};

use super::Emr;

impl Emr {
    /// The owner's subscription of this name, if it exists. Names are per owner: another principal's
    /// subscription of the same name is a different one, never visible here.
    pub async fn find_subscription(&self, name: &str, owner: &str) -> Result<Option<feed_subscription::Model>> {
        Ok(
            feed_subscription::Entity::find_by_id((owner.to_owned(), name.to_owned()))
                .one(&self.db)
                .await?,
        )
    }

    /// The feed destination a subscription follows (or would follow, if `destination` names it for a new one).
    /// Nothing is created here: the caller checks access to the destination first.
    pub async fn subscription_target(
        &self,
        existing: Option<&feed_subscription::Model>,
        name: &str,
        destination: &str,
    ) -> Result<emr_destination::Model> {
        if let Some(existing) = existing {
            if !destination.is_empty() && existing.destination != destination {
                return Err(Error::FailedPrecondition(format!(
                    "subscription '{name}' follows destination '{}', not '{destination}'",
                    existing.destination
                )));
            }
            return self.destination(&existing.destination).await;
        }
        if destination.is_empty() {
            return Err(Error::NotFound(format!(
                "you have no feed subscription '{name}'; name the feed destination to create it"
            )));
        }
        let target = self.destination(destination).await?;
        if target.kind != DestinationKind::Feed.as_str() {
            return Err(Error::FailedPrecondition(format!(
                "destination '{destination}' is a {} destination, not a feed",
                target.kind
            )));
        }
        Ok(target)
    }

    /// Creates the owner's subscription to a feed destination the caller was allowed to follow (or returns the
    /// one a concurrent call created).
    pub async fn create_subscription(
        &self,
        name: &str,
        destination: &str,
        owner: &str,
    ) -> Result<feed_subscription::Model> {
        let at = now();
        let model = feed_subscription::ActiveModel {
            name: Set(name.to_owned()),
            destination: Set(destination.to_owned()),
            cursor: Set(0),
            owner: Set(owner.to_owned()),
            created_at: Set(at),
            updated_at: Set(at),
        };
        feed_subscription::Entity::insert(model)
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await?;
        self.find_subscription(name, owner)
            .await?
            .ok_or_else(|| Error::Internal("a created subscription vanished".into()))
    }

    /// The chart entries (observation rows) that outbox rows carry.
    pub async fn observations_of(&self, rows: &[emr_outbox::Model]) -> Result<Vec<observation::Model>> {
        let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.observation_id).collect();
        Ok(observation::Entity::find()
            .filter(observation::Column::Id.is_in(ids))
            .all(&self.db)
            .await?)
    }

    /// Feed events of a destination after `cursor`, oldest first.
    pub async fn feed_page(&self, destination: &str, cursor: i64, limit: u64) -> Result<Vec<emr_outbox::Model>> {
        Ok(emr_outbox::Entity::find()
            .filter(emr_outbox::Column::Destination.eq(destination))
            .filter(emr_outbox::Column::Id.gt(cursor))
            .order_by_asc(emr_outbox::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Moves a subscription's cursor forward (never back) to an event that exists.
    pub async fn acknowledge(&self, name: &str, owner: &str, cursor: i64) -> Result<i64> {
        let subscription = self
            .find_subscription(name, owner)
            .await?
            .ok_or_else(|| Error::NotFound(format!("feed subscription '{name}' does not exist")))?;
        let exists = emr_outbox::Entity::find()
            .filter(emr_outbox::Column::Destination.eq(subscription.destination.as_str()))
            .filter(emr_outbox::Column::Id.eq(cursor))
            .one(&self.db)
            .await?
            .is_some();
        if !exists {
            return Err(Violations::single(
                "cursor",
                format!(
                    "cursor {cursor} is not an event of this subscription's feed; acknowledge a cursor you received"
                ),
            )
            .into());
        }
        feed_subscription::Entity::update_many()
            .col_expr(feed_subscription::Column::Cursor, Expr::value(cursor))
            .col_expr(feed_subscription::Column::UpdatedAt, Expr::value(now()))
            .filter(feed_subscription::Column::Owner.eq(owner))
            .filter(feed_subscription::Column::Name.eq(name))
            .filter(feed_subscription::Column::Cursor.lt(cursor))
            .exec(&self.db)
            .await?;
        Ok(self.find_subscription(name, owner).await?.map_or(cursor, |s| s.cursor))
    }
}
