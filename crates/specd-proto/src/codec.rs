//! The codec every generated client and server uses: tonic-prost's, except that a message that does not
//! decode is the sender's fault and is answered INVALID_ARGUMENT (prost's error names the message and
//! field, e.g. `GenerateRequest.prompt: invalid string value: data is not UTF-8 encoded`), where tonic
//! would answer INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost encoding and decoding with INVALID_ARGUMENT for undecodable messages.
#[derive(Debug, Clone)]
pub struct SpecdCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SpecdCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for SpecdCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SpecdDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SpecdDecoder(ProstDecoder::default())
    }
}

/// [`ProstDecoder`] with decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug)]
pub struct SpecdDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for SpecdDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == tonic::Code::Internal {
                Status::invalid_argument(s.message().to_string())
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
