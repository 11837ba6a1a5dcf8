//! gRPC handlers: convert the request (medfleet-proto), call the store, convert the result. No access checks
//! here; the RPC layer has already decided.

use medfleet_core::paging::{decode_token, encode_token, page_size};
use medfleet_core::validation::{Violations, check_slug};
use medfleet_proto::convert;
use medfleet_proto::v1::{self, registry_service_server::RegistryService};
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::error::Error;
use crate::store::Registry;

#[derive(Debug, Clone)]
pub struct RegistryApi {
    registry: Registry,
}

impl RegistryApi {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

fn paging(size: i32, token: &str, fingerprint: &str) -> Result<(u64, Option<String>), Error> {
    let mut v = Violations::new();
    let size = v.check("page_size", page_size(size));
    let after = v.check("page_token", decode_token(token, fingerprint));
    v.finish(|| Some((size?, after?))).map_err(Error::from)
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    #[instrument(skip_all)]
    async fn create_site(&self, request: Request<v1::CreateSiteRequest>) -> Reply<v1::Site> {
        let new = convert::new_site(request.get_ref()).map_err(Error::from)?;
        let site = self.registry.create_site(new).await?;
        tracing::info!(site = %site.name, "site created");
        Ok(Response::new(site.into()))
    }

    #[instrument(skip_all)]
    async fn get_site(&self, request: Request<v1::GetSiteRequest>) -> Reply<v1::Site> {
        let name = convert::slug("name", &request.get_ref().name).map_err(Error::from)?;
        Ok(Response::new(self.registry.get_site(&name).await?.into()))
    }

    #[instrument(skip_all)]
    async fn list_sites(
        &self,
        request: Request<v1::ListSitesRequest>,
    ) -> Reply<v1::ListSitesResponse> {
        let r = request.get_ref();
        let (size, after) = paging(r.page_size, &r.page_token, "sites")?;
        let page = self.registry.list_sites(size, after).await?;
        Ok(Response::new(v1::ListSitesResponse {
            sites: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next_after
                .map(|k| encode_token(&k, "sites"))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn update_site(&self, request: Request<v1::UpdateSiteRequest>) -> Reply<v1::Site> {
        let (name, display_name) = convert::site_update(request.get_ref()).map_err(Error::from)?;
        let site = self.registry.update_site(&name, display_name).await?;
        tracing::info!(site = %site.name, "site updated");
        Ok(Response::new(site.into()))
    }

    #[instrument(skip_all)]
    async fn create_ward(&self, request: Request<v1::CreateWardRequest>) -> Reply<v1::Ward> {
        let new = convert::new_ward(request.get_ref()).map_err(Error::from)?;
        let ward = self.registry.create_ward(new).await?;
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
        Ok(Response::new(
            self.registry.get_ward(&r.site, &r.name).await?.into(),
        ))
    }

    #[instrument(skip_all)]
    async fn list_wards(
        &self,
        request: Request<v1::ListWardsRequest>,
    ) -> Reply<v1::ListWardsResponse> {
        let r = request.get_ref();
        let site = convert::slug("site", &r.site).map_err(Error::from)?;
        let fingerprint = format!("wards:{site}");
        let (size, after) = paging(r.page_size, &r.page_token, &fingerprint)?;
        let page = self.registry.list_wards(&site, size, after).await?;
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
        let ward = self.registry.update_ward(&site, &name, update).await?;
        tracing::info!(ward = %ward.scope(), "ward updated");
        Ok(Response::new(ward.into()))
    }

    #[instrument(skip_all)]
    async fn register_device(
        &self,
        request: Request<v1::RegisterDeviceRequest>,
    ) -> Reply<v1::Device> {
        let new = convert::new_device(request.get_ref()).map_err(Error::from)?;
        let device = self.registry.register_device(new).await?;
        tracing::info!(device = %device.id, model = %device.model, "device registered");
        Ok(Response::new(device.into()))
    }

    #[instrument(skip_all)]
    async fn get_device(&self, request: Request<v1::GetDeviceRequest>) -> Reply<v1::Device> {
        let id = convert::device_id("id", &request.get_ref().id).map_err(Error::from)?;
        Ok(Response::new(self.registry.get_device(id).await?.into()))
    }

    #[instrument(skip_all)]
    async fn list_devices(
        &self,
        request: Request<v1::ListDevicesRequest>,
    ) -> Reply<v1::ListDevicesResponse> {
        let r = request.get_ref();
        let filter = convert::device_filter(r).map_err(Error::from)?;
        let fingerprint = filter.fingerprint();
        let (size, after) = paging(r.page_size, &r.page_token, &fingerprint)?;
        let after = after
            .map(|k| Uuid::parse_str(&k))
            .transpose()
            .map_err(|_| {
                Error::from(Violations::single(
                    "page_token",
                    "is not a page token from this listing",
                ))
            })?;
        let page = self.registry.list_devices(&filter, size, after).await?;
        Ok(Response::new(v1::ListDevicesResponse {
            devices: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next_after
                .map(|k| encode_token(&k.to_string(), &fingerprint))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all)]
    async fn update_device(&self, request: Request<v1::UpdateDeviceRequest>) -> Reply<v1::Device> {
        let (id, update) = convert::device_update(request.get_ref()).map_err(Error::from)?;
        let device = self.registry.update_device(id, update).await?;
        tracing::info!(device = %device.id, "device updated");
        Ok(Response::new(device.into()))
    }
}
