//! The wire codec of regionguard's own services (tonic-build's `codec_path`): prost, except that
//! a message that does not decode is the sender's error, INVALID_ARGUMENT naming what was wrong
//! (prost's error names the field: `ClassifyRequest.ip: invalid string value: data is not UTF-8
//! encoded`), not INTERNAL. Encoding is prost's own.
//!
//! [`ReadPastCodec`] is the same for request streams that go on past such a message: tonic hands
//! a decoder exactly one message's bytes, so a message that does not decode can be skipped whole
//! and the next one read as usual. Its items are the message or why it could not be read; the
//! streaming methods served through it (`route.rs`) answer that one message with an error
//! and go on. (A decoder that returns an error instead leaves tonic mid-message, and the stream
//! ends there.)

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::grpc::ApiError;

/// prost's codec with [`ApiError::Undecodable`] for messages that do not decode.
#[derive(Debug, Clone)]
pub struct WireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct WireDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        read(buf).map(Some)
    }
}

fn read<U: Message + Default>(buf: &mut DecodeBuf<'_>) -> Result<U, Status> {
    U::decode(buf).map_err(|error| ApiError::Undecodable(error).into())
}

/// One message of a request stream read through [`ReadPastCodec`]: the message, or why it could
/// not be read (INVALID_ARGUMENT naming what was wrong).
pub type Readable<U> = Result<U, Status>;

/// [`WireCodec`] for request streams that go on past a message that does not decode.
#[derive(Debug, Clone)]
pub struct ReadPastCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ReadPastCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ReadPastCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = Readable<U>;
    type Encoder = ProstEncoder<T>;
    type Decoder = ReadPastDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReadPastDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct ReadPastDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ReadPastDecoder<U> {
    type Item = Readable<U>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Readable<U>>, Status> {
        let message = read(buf);
        // What decoding left of an undecodable message: tonic reads the next message's header
        // right after this one's last byte.
        buf.advance(buf.remaining());
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::pb;

    #[test]
    fn undecodable_bytes_are_the_senders_error_naming_the_field() {
        let not_utf8 = [0x0a, 0x02, 0xff, 0xfe];
        let error = pb::ClassifyRequest::decode(&not_utf8[..]).unwrap_err();
        let status = Status::from(ApiError::Undecodable(error));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("ClassifyRequest.ip"),
            "{}",
            status.message()
        );
    }
}
