//! The transport: the one file that knows a session runs as an actix-web-actors actor
//! over an actix-web WebSocket. It reads frames (fragments joined, bounded by
//! `ws.max_frame_size`), pings and watches for pongs, bounds the mailbox by
//! `ws.max_pending_messages`, and hands everything else to the session core
//! (`session.rs`) through the [`Link`] it implements. Moving to actix-ws replaces this
//! file. Note that actix polls the actor only while the HTTP layer can write to the
//! socket: a client that stops reading stalls only its own session.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use broker_core::subscriber::{Deliver, Disconnect, Lagged, Notify, Regrant, Subscriber};
use bytes::BytesMut;
use bytestring::ByteString;

use crate::protocol::close;
use crate::session::{Dialect, Endpoints, Link, Pending, Session, Then};

/// Starts `session` on the connection of the upgrade request `req`.
pub(crate) fn start<D: Dialect>(
    session: Session<D>,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let max_frame = session.ws.config.max_frame_size;
    let actor = WsSession {
        session,
        last_heard: Instant::now(),
        fragments: None,
    };
    ws::WsResponseBuilder::new(actor, req, payload)
        .frame_size(max_frame)
        .protocols(&[crate::wamp::SUBPROTOCOL])
        .start()
}

/// A WebSocket connection: the session and the socket's own state.
struct WsSession<D: Dialect> {
    session: Session<D>,
    last_heard: Instant,
    /// A fragmented message being joined: whether it is text, and what came so far.
    fragments: Option<(bool, BytesMut)>,
}

/// The actor's context as the session's [`Link`].
struct Cx<'a, D: Dialect>(&'a mut ws::WebsocketContext<WsSession<D>>);

impl<D: Dialect> Link<D> for Cx<'_, D> {
    fn text(&mut self, frame: ByteString) {
        self.0.text(frame);
    }

    fn close(&mut self, code: u16, reason: &'static str) {
        self.0.close(Some(ws::CloseReason {
            code: ws::CloseCode::Other(code),
            description: Some(reason.to_owned()),
        }));
        self.0.stop();
    }

    fn wait(&mut self, fut: Pending<D>) {
        self.0.wait(fut::wrap_future(fut).map(run::<D>));
    }

    fn spawn(&mut self, fut: Pending<D>) {
        self.0.spawn(fut::wrap_future(fut).map(run::<D>));
    }

    fn later(&mut self, after: Duration, then: Then<D>) {
        self.0
            .run_later(after, move |act, ctx| then(&mut act.session, &mut Cx(ctx)));
    }

    fn subscriber(
        &self,
        id: u64,
        pending: Arc<AtomicUsize>,
        max_pending_bytes: usize,
    ) -> Subscriber {
        let addr = self.0.address();
        Subscriber {
            id,
            deliver: addr.clone().recipient(),
            lagged: addr.recipient(),
            pending_bytes: pending,
            max_pending_bytes,
        }
    }

    fn endpoints(&self) -> Endpoints {
        let addr = self.0.address();
        Endpoints {
            notify: addr.clone().recipient(),
            control: addr.clone().recipient(),
            regrant: addr.recipient(),
        }
    }
}

fn run<D: Dialect>(
    then: Then<D>,
    act: &mut WsSession<D>,
    ctx: &mut ws::WebsocketContext<WsSession<D>>,
) {
    then(&mut act.session, &mut Cx(ctx));
}

impl<D: Dialect> WsSession<D> {
    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &'static str) {
        self.session.close(&mut Cx(ctx), code, reason);
    }

    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        let cfg = &self.session.ws.config;
        let (interval, timeout) = (cfg.ping_interval, cfg.pong_timeout);
        ctx.run_interval(interval, move |_, ctx| {
            let sent = Instant::now();
            ctx.ping(b"");
            ctx.run_later(timeout, move |act, ctx| {
                if act.last_heard < sent {
                    act.close(ctx, close::NO_PONG, "no_pong");
                }
            });
        });
    }

    fn text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        self.session.heard_frame();
        D::text(&mut self.session, &mut Cx(ctx), text);
    }

    fn binary(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        self.session.heard_frame();
        D::binary(&mut self.session, &mut Cx(ctx));
    }

    /// A fragment of a message: joined until the last one, within the frame limit.
    fn fragment(&mut self, ctx: &mut ws::WebsocketContext<Self>, item: Item) {
        let (first, chunk, last) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        if let Some(is_text) = first {
            self.fragments = Some((is_text, BytesMut::new()));
        }
        let max = self.session.ws.config.max_frame_size;
        let Some((_, buf)) = self.fragments.as_mut() else {
            return self.close(ctx, close::PROTOCOL_ERROR, "protocol_error");
        };
        if buf.len() + chunk.len() > max {
            return self.close(ctx, close::TOO_BIG, "frame_too_large");
        }
        buf.extend_from_slice(&chunk);
        if last {
            let (is_text, buf) = self.fragments.take().expect("checked above");
            match (is_text, std::str::from_utf8(&buf)) {
                (true, Ok(text)) => self.text(ctx, text),
                (true, Err(_)) => self.close(ctx, close::PROTOCOL_ERROR, "protocol_error"),
                (false, _) => self.binary(ctx),
            }
        }
    }
}

impl<D: Dialect> Actor for WsSession<D> {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.session.ws.config.max_pending_messages);
        self.heartbeat(ctx);
        self.session.start(&mut Cx(ctx));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.session.stopped();
    }
}

impl<D: Dialect> StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession<D> {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        let msg = match item {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                return self.close(ctx, close::TOO_BIG, "frame_too_large");
            }
            Err(_) => return self.close(ctx, close::PROTOCOL_ERROR, "protocol_error"),
        };
        match msg {
            ws::Message::Text(text) => self.text(ctx, &text),
            ws::Message::Binary(_) => self.binary(ctx),
            ws::Message::Continuation(item) => self.fragment(ctx, item),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl<D: Dialect> Handler<Deliver> for WsSession<D> {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        self.session.deliver(&mut Cx(ctx), msg);
    }
}

impl<D: Dialect> Handler<Lagged> for WsSession<D> {
    type Result = ();

    fn handle(&mut self, msg: Lagged, ctx: &mut Self::Context) {
        self.session.lagged(&mut Cx(ctx), msg);
    }
}

impl<D: Dialect> Handler<Notify> for WsSession<D> {
    type Result = ();

    fn handle(&mut self, msg: Notify, ctx: &mut Self::Context) {
        D::notify(&mut self.session, &mut Cx(ctx), &msg.data);
    }
}

impl<D: Dialect> Handler<Regrant> for WsSession<D> {
    type Result = ();

    fn handle(&mut self, msg: Regrant, ctx: &mut Self::Context) {
        self.session.regrant(&mut Cx(ctx), msg);
    }
}

impl<D: Dialect> Handler<Disconnect> for WsSession<D> {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        self.close(ctx, msg.code, msg.reason);
    }
}
