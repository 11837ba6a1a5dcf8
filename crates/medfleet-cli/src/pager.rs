//! The one way the CLI pages through a List call: pages of the server's largest size, each asked for with the
//! previous page's token, until the server hands out an empty `next_page_token` or the caller's limit is reached.

use medfleet_core::paging::MAX_PAGE_SIZE;

/// One answer of a List call, reduced to what paging needs.
#[derive(Debug)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    /// Empty on the last page.
    next_page_token: String,
}

impl<T> Page<T> {
    pub(crate) fn new(items: Vec<T>, next_page_token: String) -> Self {
        Self { items, next_page_token }
    }
}

/// Every item of a listing, or the first `limit`: `fetch(page_size, page_token)` makes one List call. A page asks
/// for no more than is still wanted, so only a server that ignored `page_size` could hand out more.
pub(crate) async fn collect<T>(
    limit: Option<usize>,
    mut fetch: impl AsyncFnMut(i32, String) -> Result<Page<T>, tonic::Status>,
) -> Result<Vec<T>, tonic::Status> {
    let limit = limit.unwrap_or(usize::MAX);
    let largest = usize::try_from(MAX_PAGE_SIZE).unwrap_or(usize::MAX);
    let mut all = Vec::new();
    let mut token = String::new();
    while all.len() < limit {
        let page_size = i32::try_from((limit - all.len()).min(largest)).unwrap_or(i32::MAX);
        let page = fetch(page_size, token).await?;
        all.extend(page.items);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    Ok(all)
}
