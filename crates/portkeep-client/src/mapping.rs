//! A granted mapping and its renewal (RFC 6887 sections 11.2.1 and 15;
//! RFC 7767 section 3.2).

use std::net::SocketAddr;

use portkeep_proto::Nonce;

use crate::driver::{Client, RequestOptions};
use crate::error::ClientError;
use crate::reply::Reply;
use crate::request::RequestBuilder;

/// A MAP or PEER mapping the server granted, holding the request that made
/// it so that a renewal resends the same nonce and the same options
/// (RFC 6887 section 11.2.1), CHECKPOINT_REQUIRED included.
///
/// RFC 7767 section 3.2: a server without check-pointing resources still
/// grants the mapping and omits the option; a later renewal carrying the
/// option can win the checkpoint once resources free up, and a renewal
/// without it gives the checkpoint up. [`Mapping::checkpoint_honoured`]
/// always reflects the latest answer.
#[derive(Debug, Clone)]
pub struct Mapping {
    request: RequestBuilder,
    reply: Reply,
}

impl Mapping {
    /// Pairs a request with the SUCCESS reply it got. `None` for ANNOUNCE,
    /// deletes (lifetime 0) and error replies, which made no mapping.
    pub fn new(request: RequestBuilder, reply: Reply) -> Option<Mapping> {
        let made = request.nonce_value().is_some()
            && request.lifetime_value() != 0
            && reply.is_success()
            && reply.nonce == request.nonce_value();
        made.then_some(Mapping { request, reply })
    }

    /// The latest reply (the creation, or the last renewal).
    pub fn reply(&self) -> &Reply {
        &self.reply
    }

    /// The request a renewal sends.
    pub fn request(&self) -> &RequestBuilder {
        &self.request
    }

    /// The mapping's nonce (RFC 6887 section 11.1).
    pub fn nonce(&self) -> Option<Nonce> {
        self.request.nonce_value()
    }

    /// The external endpoint the server assigned.
    pub fn external(&self) -> Option<SocketAddr> {
        self.reply.external()
    }

    /// The lifetime granted by the latest reply, in seconds.
    pub fn lifetime(&self) -> u32 {
        self.reply.lifetime()
    }

    /// Whether renewals ask for check-pointing.
    pub fn checkpoint_requested(&self) -> bool {
        self.request.checkpoint_requested()
    }

    /// Whether the latest reply echoed CHECKPOINT_REQUIRED, i.e. the
    /// server says the mapping is check-pointed now (RFC 7767 section 3.2).
    pub fn checkpoint_honoured(&self) -> bool {
        self.reply.checkpoint_honoured()
    }

    /// Changes whether renewals carry CHECKPOINT_REQUIRED. Takes effect at
    /// the next [`Client::renew`]: with it the server may set the
    /// mapping's flag, without it the server clears it (RFC 7767 section
    /// 3.2).
    pub fn set_checkpoint(&mut self, wanted: bool) {
        self.request = self.request.clone().checkpoint(wanted);
    }

    /// Changes the lifetime renewals ask for (0 is refused: use a delete).
    pub fn set_lifetime(&mut self, seconds: u32) {
        if seconds != 0 {
            self.request = self.request.clone().lifetime(seconds);
        }
    }

    /// A delete of this mapping (MAP lifetime 0 with its nonce, RFC 6887
    /// section 15); `None` for PEER, which cannot be deleted early
    /// (section 12.3).
    pub fn delete_request(&self) -> Option<RequestBuilder> {
        self.request.delete_of()
    }
}

impl Client {
    /// Sends a MAP or PEER request and returns the mapping it made, ready
    /// to renew. Error replies are [`ClientError::Pcp`] as with
    /// [`Client::send`].
    pub async fn create(
        &self,
        builder: &RequestBuilder,
        opts: RequestOptions,
    ) -> Result<Mapping, ClientError> {
        let reply = self.send(builder, opts).await?;
        Mapping::new(builder.clone(), reply.clone()).ok_or(ClientError::NotAMapping {
            reply: Box::new(reply),
        })
    }

    /// Renews `mapping`: the same request again, same nonce, same options
    /// (RFC 6887 section 11.2.1), so CHECKPOINT_REQUIRED is re-sent and a
    /// checkpoint refused earlier may be honoured now (RFC 7767 section
    /// 3.2). On success the mapping holds the new reply; returns whether
    /// the checkpoint is honoured now.
    pub async fn renew(
        &self,
        mapping: &mut Mapping,
        opts: RequestOptions,
    ) -> Result<bool, ClientError> {
        let reply = self.send(&mapping.request, opts).await?;
        mapping.reply = reply;
        Ok(mapping.checkpoint_honoured())
    }
}
