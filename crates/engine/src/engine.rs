//! The engine: a loaded model with its tokenizer and template, generation (one or many sequences
//! decoded together), teacher-forced scoring, and a service thread that owns the model and batches
//! requests continuously as they arrive.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message, Segment, Tool};
use crate::device::{Compute, DeviceTransformer};
use crate::error::{Error, Result};
use crate::gguf::{sha256_file, GgufFile};
use crate::grammar::{Constraint, GrammarCompiler};
use crate::model::{Config, KvCache, SequenceStep, Transformer};
use crate::registry;
use crate::sampling::{self, Grammar, SamplingParams, TokenMask};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Compute threads (default: all cores).
    pub threads: Option<usize>,
    /// The weights as in the file, or an altered copy (to simulate cheating providers).
    pub variant: Variant,
    /// Where the forward pass runs: the native CPU path (default) or the candle device backend.
    pub device: Compute,
}

/// Which weights run. Everything but `Faithful` exists to test verification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Variant {
    /// The file's weights.
    #[default]
    Faithful,
    /// The file's `Q4_1` layers re-quantized to `Q4_0`.
    RequantizedQ4_0,
    /// The last `n` blocks skipped.
    SkipLastLayers(usize),
}

/// What a loaded model is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name it was loaded by (short name or path).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// sha256 of the file: the model's identity.
    pub sha256: String,
    /// `llama` or `gemma3`.
    pub architecture: String,
    /// Context length.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Weight formats of the embedding and the blocks.
    pub formats: Vec<String>,
    /// Bytes the KV cache holds per token of context (keys and values of every layer, f32).
    pub kv_bytes_per_token: usize,
}

/// Options of one generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Upper bound on new tokens.
    pub max_tokens: usize,
    /// Token selection.
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Stop when the text contains any of these (the stop text is not returned).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn (EOS / end-of-turn token) or a stop sequence appeared.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller cancelled.
    Cancelled,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    /// Prompt tokens.
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens, including a final end-of-turn token if the model emitted one.
    pub tokens: Vec<u32>,
    /// Generated text (without control tokens and without a matched stop sequence).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Seconds from start to the first generated token.
    pub time_to_first_token: f64,
    /// Seconds in total.
    pub elapsed: f64,
}

/// What an observer sees for each generated token.
pub struct Step<'a> {
    /// Index of the request in the batch.
    pub sequence: usize,
    /// Index of this token among the generated ones.
    pub index: usize,
    /// Absolute position of the token in the sequence (prompt length + index).
    pub position: usize,
    /// The token.
    pub token: u32,
    /// The logits it was selected from.
    pub logits: &'a [f32],
    /// Text that became complete with this token.
    pub text: &'a str,
}

/// The forward pass a model runs on.
enum Model {
    /// This crate's kernels on the CPU.
    Native(Transformer),
    /// candle tensors on a candle device.
    Device(DeviceTransformer),
}

impl Model {
    fn config(&self) -> &Config {
        match self {
            Model::Native(m) => m.config(),
            Model::Device(m) => m.config(),
        }
    }

    fn forward(&self, steps: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Model::Native(m) => m.forward(steps),
            Model::Device(m) => m.forward(steps),
        }
    }

    /// An empty KV cache of the kind this model's forward pass uses.
    fn new_cache(&self) -> KvCache {
        match self {
            Model::Native(m) => KvCache::new(m.config()),
            Model::Device(_) => KvCache::on_device(),
        }
    }
}

/// A loaded model, ready to generate and score.
pub struct Engine {
    model: Model,
    compute: Compute,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    stop_tokens: Vec<u32>,
    pool: rayon::ThreadPool,
    /// Built on the first constrained request (the token trie costs a pass over the vocabulary).
    grammar: std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

/// Per-sequence state while decoding.
/// The most prompt tokens of one sequence a forward pass takes (see [`Engine::step`]).
pub const PREFILL_CHUNK: usize = 128;

struct Live {
    cache: KvCache,
    prompt: Vec<u32>,
    pending: Vec<u32>,
    options: GenerateOptions,
    tokens: Vec<u32>,
    text: String,
    decoder: StreamDecoder,
    finish: Option<FinishReason>,
    started: Instant,
    first_token: Option<f64>,
    /// The grammar's state, when the sampling rule has one.
    constraint: Option<Constraint>,
}

impl Engine {
    /// Loads a model by known name (from the cache) or by path, with `threads` compute threads
    /// (default: all cores).
    pub fn load(name_or_path: &str, threads: Option<usize>) -> Result<Self> {
        Self::load_with(
            name_or_path,
            &LoadOptions {
                threads,
                ..Default::default()
            },
        )
    }

    /// Loads a model with options, including the altered variants a cheating provider might run.
    pub fn load_with(name_or_path: &str, options: &LoadOptions) -> Result<Self> {
        let threads = options.threads;
        // First, so that an unusable device fails before anything is read.
        let device = options.device.device()?;
        let path = registry::resolve(name_or_path)?;
        let mut file = GgufFile::open(&path)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let (model, formats) = match device {
            None => {
                let mut model = Transformer::from_gguf(&mut file)?;
                match options.variant {
                    Variant::Faithful => {}
                    Variant::RequantizedQ4_0 => model.requantize_q4_0()?,
                    Variant::SkipLastLayers(n) => model.skip_last_layers(n),
                }
                let formats = model.formats().into_iter().map(String::from).collect();
                (Model::Native(model), formats)
            }
            Some(device) => (
                Model::Device(DeviceTransformer::from_gguf(
                    &mut file,
                    &device,
                    options.variant,
                )?),
                vec!["F32".to_owned()],
            ),
        };
        let config = model.config();
        let arch = config.architecture.name();
        let template = ChatTemplate::detect(file.string("tokenizer.chat_template").ok(), arch);
        let mut stop_tokens: Vec<u32> = tokenizer.eos.into_iter().collect();
        if let Some(id) = tokenizer.token_id(template.end_of_turn()) {
            stop_tokens.push(id);
        }
        let info = ModelInfo {
            name: name_or_path.to_owned(),
            sha256: sha256_file(&path)?,
            path,
            architecture: arch.into(),
            context_length: config.context_length,
            vocab_size: config.vocab_size,
            layers: config.layers,
            formats,
            // Native caches hold f16, the device backend's f32.
            kv_bytes_per_token: config.layers
                * config.kv_dim()
                * 2
                * match model {
                    Model::Native(_) => std::mem::size_of::<half::f16>(),
                    Model::Device(_) => std::mem::size_of::<f32>(),
                },
        };
        let mut pool = rayon::ThreadPoolBuilder::new();
        if let Some(n) = threads {
            pool = pool.num_threads(n);
        }
        let pool = pool
            .build()
            .map_err(|e| Error::InvalidRequest(format!("thread pool: {e}")))?;
        tracing::info!(model = %info.name, sha256 = %info.sha256, device = %options.device, threads = pool.current_num_threads(), "model loaded");
        Ok(Self {
            model,
            compute: options.device,
            tokenizer,
            template,
            info,
            stop_tokens,
            pool,
            grammar: std::sync::OnceLock::new(),
        })
    }

    /// The grammar compiler over this model's vocabulary (built once, on first use).
    pub fn grammar(&self) -> Result<&GrammarCompiler> {
        self.grammar
            .get_or_init(|| {
                GrammarCompiler::new(&self.tokenizer, self.vocab_size(), &self.stop_tokens)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::Grammar(e.clone()))
    }

    /// The token masks of `grammar` at every position of `tokens` (a verifier's replay).
    pub fn grammar_masks(&self, grammar: &Grammar, tokens: &[u32]) -> Result<Vec<TokenMask>> {
        self.grammar()?.masks(grammar, tokens)
    }

    /// What was loaded.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Where the forward pass runs.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Compute threads of the CPU paths.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Tokens that end a turn.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The prompt tokens of a conversation, ending with the assistant's turn opening.
    pub fn chat_prompt(&self, messages: &[Message]) -> Vec<u32> {
        self.chat_prompt_with_tools(messages, &[])
    }

    /// [`Engine::chat_prompt`] with functions the model may call, rendered by the template.
    pub fn chat_prompt_with_tools(&self, messages: &[Message], tools: &[Tool]) -> Vec<u32> {
        let mut tokens = Vec::new();
        for seg in self.template.render_with_tools(messages, tools) {
            match seg {
                Segment::Markup(m) => tokens.extend(self.tokenizer.encode_with_special(&m)),
                Segment::Content(c) => tokens.extend(self.tokenizer.encode(&c)),
            }
        }
        tokens
    }

    /// Tokens of a plain completion prompt (BOS first when the model wants it).
    pub fn completion_prompt(&self, text: &str) -> Vec<u32> {
        let mut tokens: Vec<u32> = if self.tokenizer.add_bos {
            self.tokenizer.bos.into_iter().collect()
        } else {
            Vec::new()
        };
        tokens.extend(self.tokenizer.encode(text));
        tokens
    }

    /// [`Engine::chat_prompt`], refusing conversations whose text exceeds
    /// [`crate::tokenizer::MAX_TEXT_BYTES`] with [`Error::PromptTooLong`] before tokenizing any of it.
    pub fn try_chat_prompt(&self, request: &tessera_types::JobRequest) -> Result<Vec<u32>> {
        crate::tokenizer::check_text_len(request.prompt_bytes())?;
        Ok(self.chat_prompt_with_tools(&request.messages, &request.tools))
    }

    /// [`Engine::completion_prompt`], refusing texts over [`crate::tokenizer::MAX_TEXT_BYTES`].
    pub fn try_completion_prompt(&self, text: &str) -> Result<Vec<u32>> {
        crate::tokenizer::check_text_len(text.len())?;
        Ok(self.completion_prompt(text))
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let context = self.model.config().context_length;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= context {
            return Err(Error::ContextOverflow {
                tokens: prompt.len() + 1,
                context,
            });
        }
        if let Some(&t) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config().vocab_size)
        {
            return Err(Error::BadToken(t));
        }
        Ok(())
    }

    /// Generates for one prompt; `observer` sees every token and may return `false` to cancel.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut observer: impl FnMut(&Step<'_>) -> bool,
    ) -> Result<Generation> {
        let mut out =
            self.generate_batch(&[(prompt.to_vec(), options.clone())], |s| observer(s))?;
        Ok(out.remove(0))
    }

    /// Generates for several prompts decoded together (one forward pass per step for all of them).
    pub fn generate_batch(
        &self,
        requests: &[(Vec<u32>, GenerateOptions)],
        mut observer: impl FnMut(&Step<'_>) -> bool,
    ) -> Result<Vec<Generation>> {
        let mut live = Vec::with_capacity(requests.len());
        for (prompt, options) in requests {
            live.push(self.start(prompt.clone(), options.clone())?);
        }
        while live.iter().any(|l| l.finish.is_none()) {
            self.step(&mut live, &mut observer)?;
        }
        Ok(live.into_iter().map(Self::finish).collect())
    }

    fn start(&self, prompt: Vec<u32>, options: GenerateOptions) -> Result<Live> {
        self.check_prompt(&prompt)?;
        let constraint = match &options.sampling.grammar {
            Some(g) => Some(self.grammar()?.compile(g)?),
            None => None,
        };
        Ok(Live {
            constraint,
            cache: self.model.new_cache(),
            pending: prompt.clone(),
            prompt,
            options,
            tokens: Vec::new(),
            text: String::new(),
            decoder: StreamDecoder::default(),
            finish: None,
            started: Instant::now(),
            first_token: None,
        })
    }

    fn finish(l: Live) -> Generation {
        Generation {
            prompt_tokens: l.prompt,
            tokens: l.tokens,
            text: l.text,
            finish_reason: l.finish.unwrap_or(FinishReason::Length),
            time_to_first_token: l.first_token.unwrap_or_default(),
            elapsed: l.started.elapsed().as_secs_f64(),
        }
    }

    /// One forward pass over every unfinished sequence (prefilling new ones, decoding the others),
    /// then one token selected for each.
    fn step(&self, live: &mut [Live], observer: &mut dyn FnMut(&Step<'_>) -> bool) -> Result<()> {
        let active: Vec<usize> = (0..live.len())
            .filter(|&i| live[i].finish.is_none())
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        // Long prompts go in pieces of PREFILL_CHUNK tokens, so that a pass's activations stay
        // bounded whatever the prompt's length. Rows are computed independently of the batch
        // and attend to the same cached keys either way, so the result is bitwise the same.
        for &i in &active {
            let l = &mut live[i];
            while l.pending.len() > PREFILL_CHUNK {
                let rest = l.pending.split_off(PREFILL_CHUNK);
                let chunk = std::mem::replace(&mut l.pending, rest);
                let mut piece = [SequenceStep {
                    cache: &mut l.cache,
                    tokens: &chunk,
                    logits_from: None,
                }];
                self.pool.install(|| self.model.forward(&mut piece))?;
            }
        }
        let logits = {
            let mut steps: Vec<SequenceStep<'_>> = Vec::with_capacity(active.len());
            let mut rest: &mut [Live] = live;
            let mut base = 0;
            for &i in &active {
                let (_, tail) = rest.split_at_mut(i - base);
                let (this, tail) = tail.split_first_mut().expect("index in range");
                steps.push(SequenceStep {
                    cache: &mut this.cache,
                    tokens: &this.pending,
                    logits_from: None,
                });
                rest = tail;
                base = i + 1;
            }
            self.pool.install(|| self.model.forward(&mut steps))?
        };
        let context = self.model.config().context_length;
        for (k, &i) in active.iter().enumerate() {
            let l = &mut live[i];
            let position = l.cache.len();
            let mask = l.constraint.as_mut().map(Constraint::next_mask);
            let adjusted = l.options.sampling.adjusted(&logits[k], &l.tokens);
            let token = sampling::select_masked(
                adjusted.as_deref().unwrap_or(&logits[k]),
                &l.options.sampling,
                position as u64,
                mask.as_ref(),
            );
            if let Some(c) = l.constraint.as_mut() {
                c.accept(token);
            }
            l.tokens.push(token);
            if l.first_token.is_none() {
                l.first_token = Some(l.started.elapsed().as_secs_f64());
            }
            let piece = if self.stop_tokens.contains(&token) {
                String::new()
            } else {
                l.decoder.push(&self.tokenizer, token)
            };
            l.text.push_str(&piece);
            let step = Step {
                sequence: i,
                index: l.tokens.len() - 1,
                position,
                token,
                logits: &logits[k],
                text: &piece,
            };
            if !observer(&step) {
                l.finish = Some(FinishReason::Cancelled);
            } else if self.stop_tokens.contains(&token) && !l.options.ignore_eos {
                l.finish = Some(FinishReason::Stop);
            } else if let Some(at) = l
                .options
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| l.text.find(s.as_str()))
                .min()
            {
                l.text.truncate(at);
                l.finish = Some(FinishReason::Stop);
            } else if l.tokens.len() >= l.options.max_tokens || position + 1 >= context {
                l.finish = Some(FinishReason::Length);
            }
            l.pending = vec![token];
        }
        Ok(())
    }

    /// Teacher-forced scoring: one batched pass over `tokens`, returning the logits of every position
    /// (`tokens.len() × vocab`, row `i` predicts token `i + 1`). Verification runs this.
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.score_from(tokens, 0)
    }

    /// Like [`Engine::score`], but returns only the rows from position `from` on
    /// (`(tokens.len() - from) × vocab`): a verifier needs the answer's positions, not the prompt's.
    pub fn score_from(&self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        self.check_prompt(tokens)?;
        if from >= tokens.len() {
            return Err(Error::InvalidRequest(format!(
                "scoring from position {from} of {} tokens",
                tokens.len()
            )));
        }
        let mut cache = self.model.new_cache();
        let mut steps = [SequenceStep {
            cache: &mut cache,
            tokens,
            logits_from: Some(from),
        }];
        let mut out = self.pool.install(|| self.model.forward(&mut steps))?;
        Ok(out.remove(0))
    }

    /// Vocabulary size (width of a logits row).
    pub fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

/// An event streamed back to a caller of [`EngineService`].
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token with the text it completed and (when requested) its logits.
    Token {
        /// The token id.
        token: u32,
        /// Text that became complete.
        text: String,
        /// Logits it was chosen from, if the request asked for them.
        logits: Option<Vec<f32>>,
    },
    /// Generation finished.
    Done(Generation),
    /// Generation failed.
    Failed(String),
}

/// A request to the service.
pub struct ServiceRequest {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Options.
    pub options: GenerateOptions,
    /// Whether each token event carries its logits (for commitments).
    pub with_logits: bool,
    /// Where events go; a dropped receiver cancels the request.
    pub events: mpsc::Sender<Event>,
}

/// A thread that owns an [`Engine`] and decodes every in-flight request together, admitting new
/// requests between steps (continuous batching). Callers never hold the model.
#[derive(Clone)]
pub struct EngineService {
    requests: mpsc::Sender<ServiceRequest>,
    info: ModelInfo,
}

impl EngineService {
    /// Starts the service thread; at most `max_batch` sequences decode together.
    pub fn spawn(engine: Engine, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<ServiceRequest>();
        let info = engine.info().clone();
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || Self::run(engine, rx, max_batch.max(1)))
            .expect("spawn the engine thread");
        Self { requests: tx, info }
    }

    /// The model served.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Submits a request; events arrive on the returned receiver.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
        with_logits: bool,
    ) -> Result<mpsc::Receiver<Event>> {
        let (events, rx) = mpsc::channel();
        self.requests
            .send(ServiceRequest {
                prompt,
                options,
                with_logits,
                events,
            })
            .map_err(|_| Error::EngineStopped)?;
        Ok(rx)
    }

    fn run(engine: Engine, rx: mpsc::Receiver<ServiceRequest>, max_batch: usize) {
        let mut live: Vec<Live> = Vec::new();
        let mut sinks: Vec<(mpsc::Sender<Event>, bool)> = Vec::new();
        loop {
            // Block only when idle; otherwise admit whatever has arrived.
            if live.is_empty() {
                match rx.recv() {
                    Ok(r) => Self::admit(&engine, r, &mut live, &mut sinks),
                    Err(_) => return,
                }
            }
            while live.len() < max_batch {
                match rx.try_recv() {
                    Ok(r) => Self::admit(&engine, r, &mut live, &mut sinks),
                    Err(_) => break,
                }
            }
            if live.is_empty() {
                continue;
            }
            let mut observer = |s: &Step<'_>| {
                let (sink, with_logits) = &sinks[s.sequence];
                let logits = with_logits.then(|| s.logits.to_vec());
                sink.send(Event::Token {
                    token: s.token,
                    text: s.text.to_owned(),
                    logits,
                })
                .is_ok()
            };
            if let Err(e) = engine.step(&mut live, &mut observer) {
                for (sink, _) in sinks.drain(..) {
                    let _ = sink.send(Event::Failed(e.to_string()));
                }
                live.clear();
                continue;
            }
            let mut i = 0;
            while i < live.len() {
                if live[i].finish.is_some() {
                    let l = live.remove(i);
                    let (sink, _) = sinks.remove(i);
                    let _ = sink.send(Event::Done(Engine::finish(l)));
                } else {
                    i += 1;
                }
            }
        }
    }

    fn admit(
        engine: &Engine,
        r: ServiceRequest,
        live: &mut Vec<Live>,
        sinks: &mut Vec<(mpsc::Sender<Event>, bool)>,
    ) {
        match engine.start(r.prompt, r.options) {
            Ok(l) => {
                live.push(l);
                sinks.push((r.events, r.with_logits));
            }
            Err(e) => {
                let _ = r.events.send(Event::Failed(e.to_string()));
            }
        }
    }
}
