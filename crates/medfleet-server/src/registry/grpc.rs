//! gRPC handlers: convert the request (medfleet-proto), call the store, convert the result. No access checks
//! here; the RPC layer has already decided.

use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_slug};
use medfleet_proto::convert;
use medfleet_proto::v1::{self, registry_service_server::RegistryService};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use medfleet_core::registry::{Device, DeviceFilter};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::devices::presence;
use crate::persistence::events::{Event, Events};

use crate::authz::policy::{access_withdrawn, visibility};
use crate::authz::visibility::Visibility;
use crate::error::Error;
use crate::identity::credentials::{Credentials, DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, MIN_TOKEN_TTL};
use crate::registry::store::Registry;
use crate::transport::rpc::{audit_context, caller};

/// Most devices one `ImportDevices` call may carry (one transaction).
pub const MAX_IMPORT: usize = 1000;

#[derive(Debug, Clone)]
pub struct RegistryApi {
    registry: Registry,
    credentials: Credentials,
    events: Arc<Events>,
    access: Arc<crate::authz::access::Access>,
}

impl RegistryApi {
    pub fn new(
        registry: Registry,
        credentials: Credentials,
        events: Arc<Events>,
        access: Arc<crate::authz::access::Access>,
    ) -> Self {
        Self {
            registry,
            credentials,
            events,
            access,
        }
    }

    /// Devices with their presence attached.
    async fn with_presence(&self, devices: Vec<Device>) -> Result<Vec<v1::Device>, Error> {
        let ids: Vec<Uuid> = devices.iter().map(|d| d.id).collect();
        let mut presence = presence::load(self.registry.db(), &ids).await?;
        Ok(devices
            .into_iter()
            .map(|d| {
                let p = presence.remove(&d.id);
                let mut wire = v1::Device::from(d);
                wire.presence = p.map(Into::into);
                wire
            })
            .collect())
    }
}

/// Events for `WatchDevices`: buffered per watcher; a watcher too slow for this many is resynchronised.
const WATCH_BUFFER: usize = 1024;
/// Most changed devices read back in one query for a watcher.
const WATCH_BATCH: usize = 500;

/// Whether a watcher with `visibility` and the given filter sees `device`.
fn watched(device: &Device, visibility: &Visibility, site: &str, ward: &str) -> bool {
    match &device.location {
        Some(l) => {
            visibility.sees_place(Some(&l.site), Some(&l.ward))
                && (site.is_empty() || l.site == site)
                && (ward.is_empty() || l.ward == ward)
        }
        None => visibility.sees_place(None, None) && site.is_empty(),
    }
}

fn token_ttl(field: &str, ttl: Option<&prost_types::Duration>) -> Result<std::time::Duration, String> {
    convert::duration(field, ttl, DEFAULT_TOKEN_TTL, MIN_TOKEN_TTL, MAX_TOKEN_TTL).map_err(|e| field_message(&e))
}

fn paging(size: i32, token: &str, fingerprint: &str) -> Result<(u64, Option<String>), Error> {
    let mut v = Violations::new();
    let size = v.check("page_size", page_size(size));
    let after = v.check("page_token", decode_token(token, fingerprint));
    v.finish(|| Some((size?, after?))).map_err(Error::from)
}

type Reply<T> = Result<Response<T>, Status>;

/// The description of a single-field violation, to fold into a request's own list.
fn field_message(violations: &Violations) -> String {
    violations
        .iter()
        .map(|v| v.description.clone())
        .collect::<Vec<_>>()
        .join("; ")
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    #[instrument(skip_all)]
    async fn create_site(&self, request: Request<v1::CreateSiteRequest>) -> Reply<v1::Site> {
        let new = convert::new_site(request.get_ref()).map_err(Error::from)?;
        let site = self.registry.create_site(new, &audit_context(&request)).await?;
        tracing::info!(site = %site.name, "site created");
        Ok(Response::new(site.into()))
    }

    #[instrument(skip_all)]
    async fn get_site(&self, request: Request<v1::GetSiteRequest>) -> Reply<v1::Site> {
        let name = convert::slug("name", &request.get_ref().name).map_err(Error::from)?;
        Ok(Response::new(self.registry.get_site(&name).await?.into()))
    }

    #[instrument(skip_all)]
    async fn list_sites(&self, request: Request<v1::ListSitesRequest>) -> Reply<v1::ListSitesResponse> {
        let r = request.get_ref();
        let (size, after) = paging(r.page_size, &r.page_token, "sites")?;
        let page = self.registry.list_sites(size, after, &visibility(&request)).await?;
        Ok(Response::new(v1::ListSitesResponse {
            sites: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page.next_after.map(|k| encode_token(&k, "sites")).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn update_site(&self, request: Request<v1::UpdateSiteRequest>) -> Reply<v1::Site> {
        let update = convert::site_update(request.get_ref()).map_err(Error::from)?;
        let site = self.registry.update_site(update, &audit_context(&request)).await?;
        tracing::info!(site = %site.name, "site updated");
        Ok(Response::new(site.into()))
    }

    #[instrument(skip_all)]
    async fn create_ward(&self, request: Request<v1::CreateWardRequest>) -> Reply<v1::Ward> {
        let new = convert::new_ward(request.get_ref()).map_err(Error::from)?;
        let ward = self.registry.create_ward(new, &audit_context(&request)).await?;
        tracing::info!(ward = %ward.scope(), "ward created");
        Ok(Response::new(ward.into()))
    }

    #[instrument(skip_all)]
    async fn get_ward(&self, request: Request<v1::GetWardRequest>) -> Reply<v1::Ward> {
        let r = request.get_ref();
        let mut v = Violations::new();
        v.check("site", check_slug(&r.site));
        v.check("name", check_slug(&r.name));
        v.finish(|| Some(())).map_err(Error::from)?;
        Ok(Response::new(self.registry.get_ward(&r.site, &r.name).await?.into()))
    }

    #[instrument(skip_all)]
    async fn list_wards(&self, request: Request<v1::ListWardsRequest>) -> Reply<v1::ListWardsResponse> {
        let r = request.get_ref();
        let site = convert::slug("site", &r.site).map_err(Error::from)?;
        let fingerprint = format!("wards:{site}");
        let (size, after) = paging(r.page_size, &r.page_token, &fingerprint)?;
        let page = self
            .registry
            .list_wards(&site, size, after, &visibility(&request))
            .await?;
        Ok(Response::new(v1::ListWardsResponse {
            wards: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next_after
                .map(|k| encode_token(&k, &fingerprint))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn update_ward(&self, request: Request<v1::UpdateWardRequest>) -> Reply<v1::Ward> {
        let (site, name, update) = convert::ward_update(request.get_ref()).map_err(Error::from)?;
        let ward = self
            .registry
            .update_ward(&site, &name, update, &audit_context(&request))
            .await?;
        tracing::info!(ward = %ward.scope(), "ward updated");
        Ok(Response::new(ward.into()))
    }

    #[instrument(skip_all)]
    async fn register_device(&self, request: Request<v1::RegisterDeviceRequest>) -> Reply<v1::Device> {
        let new = convert::new_device(request.get_ref()).map_err(Error::from)?;
        let device = self.registry.register_device(new, &audit_context(&request)).await?;
        tracing::info!(device = %device.id, model = %device.model, "device registered");
        Ok(Response::new(device.into()))
    }

    #[instrument(skip_all)]
    async fn get_device(&self, request: Request<v1::GetDeviceRequest>) -> Reply<v1::Device> {
        let id = convert::device_id("id", &request.get_ref().id).map_err(Error::from)?;
        let device = self.registry.get_device(id).await?;
        let mut devices = self.with_presence(vec![device]).await?;
        devices
            .pop()
            .map(Response::new)
            .ok_or_else(|| Status::internal("the device vanished while reading it"))
    }

    #[instrument(skip_all)]
    async fn list_devices(&self, request: Request<v1::ListDevicesRequest>) -> Reply<v1::ListDevicesResponse> {
        let r = request.get_ref();
        let filter = convert::device_filter(r).map_err(Error::from)?;
        let fingerprint = filter.fingerprint();
        let (size, after) = paging(r.page_size, &r.page_token, &fingerprint)?;
        let after = after.map(|k| Uuid::parse_str(&k)).transpose().map_err(|_| {
            Error::from(Violations::single(
                "page_token",
                "is not a page token from this listing",
            ))
        })?;
        let page = self
            .registry
            .list_devices(&filter, size, after, &visibility(&request))
            .await?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: self.with_presence(page.items).await?,
            next_page_token: page
                .next_after
                .map(|k| encode_token(&k.to_string(), &fingerprint))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn issue_enrollment_token(
        &self,
        request: Request<v1::IssueEnrollmentTokenRequest>,
    ) -> Reply<v1::EnrollmentToken> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        let id = v.check(
            "device_id",
            convert::device_id("device_id", &r.device_id).map_err(|e| field_message(&e)),
        );
        let ttl = v.check("ttl", token_ttl("ttl", r.ttl.as_ref()));
        let (id, ttl) = v.finish(|| id.zip(ttl)).map_err(Error::from)?;
        let token = self
            .credentials
            .issue_enrollment_token(id, ttl, r.replace, &caller.identity, &audit_context(&request))
            .await?;
        tracing::info!(device = %id, expires = %token.expires_at, "enrollment token issued");
        Ok(Response::new(v1::EnrollmentToken {
            device_id: id.to_string(),
            token: token.token,
            expire_time: Some(convert::timestamp(token.expires_at)),
        }))
    }

    #[instrument(skip_all, fields(count = request.get_ref().devices.len()))]
    async fn import_devices(&self, request: Request<v1::ImportDevicesRequest>) -> Reply<v1::ImportDevicesResponse> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let mut v = Violations::new();
        if r.devices.is_empty() || r.devices.len() > MAX_IMPORT {
            v.push("devices", format!("send 1 to {MAX_IMPORT} devices per call"));
        }
        let ttl = if r.issue_tokens {
            v.check("token_ttl", token_ttl("token_ttl", r.token_ttl.as_ref()))
        } else {
            None
        };
        let mut devices = Vec::with_capacity(r.devices.len());
        for (i, device) in r.devices.iter().enumerate() {
            match convert::new_device(device) {
                Ok(new) => devices.push(new),
                Err(errors) => {
                    for e in errors.iter() {
                        v.push(format!("devices[{i}].{}", e.field), e.description.clone());
                    }
                }
            }
        }
        v.finish(|| Some(())).map_err(Error::from)?;
        let tokens = ttl.map(|ttl| (ttl, &caller.identity));
        let imported = self
            .credentials
            .import_devices(devices, tokens, &audit_context(&request))
            .await?;
        tracing::info!(count = imported.len(), tokens = r.issue_tokens, "devices imported");
        Ok(Response::new(v1::ImportDevicesResponse {
            devices: imported
                .into_iter()
                .map(|(device, token)| v1::ImportedDevice {
                    device: Some(device.into()),
                    token_expire_time: token.as_ref().map(|t| convert::timestamp(t.expires_at)),
                    token: token.map(|t| t.token).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn revoke_device(&self, request: Request<v1::RevokeDeviceRequest>) -> Reply<v1::Device> {
        let r = request.get_ref();
        let id = convert::device_id("id", &r.id).map_err(Error::from)?;
        let reason = convert::revocation_reason_from_wire(r.reason).map_err(Error::from)?;
        let device = self
            .credentials
            .revoke_device(id, reason, false, &audit_context(&request))
            .await?;
        tracing::info!(device = %id, reason = reason.as_str(), "device certificates revoked");
        Ok(Response::new(device.into()))
    }

    #[instrument(skip_all)]
    async fn decommission_device(&self, request: Request<v1::DecommissionDeviceRequest>) -> Reply<v1::Device> {
        let id = convert::device_id("id", &request.get_ref().id).map_err(Error::from)?;
        let device = self
            .credentials
            .revoke_device(
                id,
                medfleet_core::identity::RevocationReason::CessationOfOperation,
                true,
                &audit_context(&request),
            )
            .await?;
        tracing::info!(device = %id, "device decommissioned");
        Ok(Response::new(device.into()))
    }

    #[instrument(skip_all)]
    async fn update_device(&self, request: Request<v1::UpdateDeviceRequest>) -> Reply<v1::Device> {
        let (id, update) = convert::device_update(request.get_ref()).map_err(Error::from)?;
        let device = self
            .registry
            .update_device(id, update, &audit_context(&request))
            .await?;
        // A device that moved may resolve to another configuration; its session's replica recomputes it.
        self.events.publish(self.registry.db(), Event::Config).await;
        tracing::info!(device = %device.id, "device updated");
        Ok(Response::new(device.into()))
    }

    type WatchDevicesStream = Pin<Box<dyn Stream<Item = Result<v1::DeviceEvent, Status>> + Send>>;

    #[instrument(skip_all)]
    async fn watch_devices(&self, request: Request<v1::WatchDevicesRequest>) -> Reply<Self::WatchDevicesStream> {
        let visibility = visibility(&request);
        let subject = caller(&request)?.identity.to_string();
        let r = request.into_inner();
        let filter = DeviceFilter::parse(&r.site, &r.ward, "", None, &[]).map_err(Error::from)?;
        // Subscribed before the initial listing, so no change between the two is missed.
        let mut events = self.events.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let api = self.clone();
        let (access, granted, denied) = (self.access.clone(), visibility.clone(), tx.clone());
        let watching = async move {
            let send_all = |api: RegistryApi, tx: mpsc::Sender<Result<v1::DeviceEvent, Status>>| {
                let (filter, visibility) = (filter.clone(), visibility.clone());
                async move {
                    let mut after = None;
                    loop {
                        let page = api.registry.list_devices(&filter, 500, after, &visibility).await?;
                        for device in api.with_presence(page.items).await? {
                            if tx.send(Ok(v1::DeviceEvent { device: Some(device) })).await.is_err() {
                                return Ok::<bool, Error>(false);
                            }
                        }
                        match page.next_after {
                            Some(next) => after = Some(next),
                            None => return Ok(true),
                        }
                    }
                }
            };
            if r.initial && !matches!(send_all(api.clone(), tx.clone()).await, Ok(true)) {
                return;
            }
            loop {
                let event = tokio::select! {
                    () = tx.closed() => return,
                    event = events.recv() => event,
                };
                // A burst (a ward applying a change) is read back in one query rather than one per device.
                let mut changed = std::collections::BTreeSet::new();
                let mut resync = false;
                let mut next = Some(event);
                while let Some(event) = next.take() {
                    match event {
                        Ok(Event::Presence { device }) => {
                            changed.insert(device);
                        }
                        Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => resync = true,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    if changed.len() < WATCH_BATCH {
                        next = match events.try_recv() {
                            Ok(event) => Some(Ok(event)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(n)))
                            }
                            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => None,
                        };
                    }
                }
                if resync {
                    if !matches!(send_all(api.clone(), tx.clone()).await, Ok(true)) {
                        return;
                    }
                    continue;
                }
                let ids: Vec<Uuid> = changed.into_iter().collect();
                let Ok(found) = api.registry.devices_by_id(&ids).await else {
                    continue;
                };
                let visible: Vec<Device> = found
                    .into_iter()
                    .filter(|d| watched(d, &visibility, &r.site, &r.ward))
                    .collect();
                let Ok(wire) = api.with_presence(visible).await else {
                    continue;
                };
                for device in wire {
                    if tx.send(Ok(v1::DeviceEvent { device: Some(device) })).await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = watching => {}
                status = access_withdrawn(&access, &subject, "device", "read", |now| now.covers(&granted)) => {
                    let _ = denied.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
