'use strict'
// Test harness for the nsqjs compatibility suite: starts a real knsq-broker on loopback port 0
// with a temporary data directory, creates nsqjs Readers/Writers bound to it, and closes
// everything when a test ends. Every wait is bounded, so no test can hang.

const assert = require('node:assert/strict')
const {execFileSync, spawn} = require('node:child_process')
const crypto = require('node:crypto')
const fs = require('node:fs')
const https = require('node:https')
const os = require('node:os')
const path = require('node:path')
const {test} = require('node:test')
const nsq = require('nsqjs')

const REPO = path.resolve(__dirname, '..', '..')
const BROKER_BIN =
  process.env.KNSQ_BROKER_BIN || path.join(REPO, 'target', 'debug', 'knsq-broker')
const LOOKUPD_BIN =
  process.env.KNSQ_LOOKUPD_BIN || path.join(REPO, 'target', 'debug', 'knsq-lookupd')

const STARTUP_TIMEOUT_MS = 30000
const STOP_TIMEOUT_MS = 10000
const TEST_TIMEOUT_MS = 30000

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Rejects with `what` if `promise` has not settled within `ms`. */
function within(ms, promise, what) {
  let timer
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/**
 * Spawns `bin` for `owner` (a Broker or Lookupd: sets its `proc` and `exited`, appends to its
 * `log`) and waits until the log has named an address for every one of `patterns`, filling
 * `owner.addresses`. A process that exits or stays silent first is stopped, and the error
 * carries its log.
 */
async function startListening(owner, bin, argv, patterns, name) {
  owner.log.push(`$ ${bin} ${argv.join(' ')}`)
  owner.proc = spawn(bin, argv, {stdio: ['ignore', 'pipe', 'pipe']})
  owner.exited = new Promise((resolve) => {
    owner.proc.on('exit', (code, signal) => resolve({code, signal}))
    owner.proc.on('error', (err) => {
      owner.log.push(`spawn error: ${err.message}`)
      resolve({code: null, signal: null, error: err})
    })
  })
  const listening = new Promise((resolve) => {
    const onLine = (line) => {
      owner.log.push(line)
      for (const [kind, re] of Object.entries(patterns)) {
        const m = re.exec(line)
        if (m && !owner.addresses[kind]) owner.addresses[kind] = m[1]
      }
      if (Object.keys(patterns).every((kind) => owner.addresses[kind])) resolve()
    }
    for (const stream of [owner.proc.stdout, owner.proc.stderr]) {
      let pending = ''
      stream.setEncoding('utf8')
      stream.on('data', (chunk) => {
        pending += chunk
        const lines = pending.split('\n')
        pending = lines.pop()
        lines.forEach(onLine)
      })
    }
  })
  const exitedEarly = owner.exited.then(({code, signal}) => {
    throw new Error(`knsq-${name} exited before listening (code ${code}, signal ${signal})`)
  })
  try {
    await within(STARTUP_TIMEOUT_MS, Promise.race([listening, exitedEarly]), `knsq-${name} listening lines`)
  } catch (err) {
    await owner.stop()
    err.message += `\n--- ${name} log ---\n${owner.logText()}`
    throw err
  }
  exitedEarly.catch(() => {}) // it settles (rejected) when the process stops
}

class Broker {
  /**
   * `httpsClient` ({ca, cert?, key?} Buffers): talk to the HTTP API over `--https-address`
   * (which `args` must set) with these TLS options, as a broker with `--tls-required=true` or a
   * client-auth policy refuses plain HTTP.
   */
  constructor(args, {httpsClient = null} = {}) {
    this.args = args
    this.httpsClient = httpsClient
    this.dataPath = fs.mkdtempSync(path.join(os.tmpdir(), 'knsq-compat-node-'))
    this.log = []
    this.addresses = {}
  }

  async start() {
    const argv = [
      '--tcp-address=127.0.0.1:0',
      '--http-address=127.0.0.1:0',
      `--data-path=${this.dataPath}`,
      ...this.args,
    ]
    const patterns = {tcp: /TCP: listening on (\S+)/, http: /HTTP: listening on (\S+)/}
    if (this.args.some((arg) => arg.startsWith('--https-address'))) {
      patterns.https = /HTTPS: listening on (\S+)/
    }
    await startListening(this, BROKER_BIN, argv, patterns, 'broker')
    return this
  }

  get tcpAddress() {
    return this.addresses.tcp
  }

  get tcpHostPort() {
    const i = this.addresses.tcp.lastIndexOf(':')
    return [this.addresses.tcp.slice(0, i), Number(this.addresses.tcp.slice(i + 1))]
  }

  logText() {
    return this.log.slice(-300).join('\n')
  }

  /**
   * SIGTERM, then SIGKILL after STOP_TIMEOUT_MS. Resolves with a description of why the stop
   * was not clean (null when the broker exited with code 0 on SIGTERM).
   */
  async stop() {
    let problem = null
    if (!this.proc) return problem
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
      problem = `it had already exited (code ${this.proc.exitCode}, signal ${this.proc.signalCode}) before SIGTERM`
    } else {
      this.proc.kill('SIGTERM')
      try {
        const {code, signal} = await within(STOP_TIMEOUT_MS, this.exited, 'knsq-broker exit after SIGTERM')
        if (code !== 0) problem = `it exited with code ${code} (signal ${signal}) on SIGTERM`
      } catch {
        this.proc.kill('SIGKILL')
        await this.exited
        problem = `it was still running ${STOP_TIMEOUT_MS} ms after SIGTERM and was killed`
      }
    }
    fs.rmSync(this.dataPath, {recursive: true, force: true})
    return problem
  }

  // --- HTTP API ---

  async http(method, pathAndQuery, body) {
    if (this.httpsClient) {
      return httpsRequest(method, `https://${this.addresses.https}${pathAndQuery}`, this.httpsClient, body)
    }
    return this.plainHttp(method, pathAndQuery, body)
  }

  /** A request to the plain `--http-address`, even when the broker is used over HTTPS. */
  async plainHttp(method, pathAndQuery, body) {
    const res = await fetch(`http://${this.addresses.http}${pathAndQuery}`, {
      method,
      body,
      signal: AbortSignal.timeout(10000),
    })
    return {status: res.status, text: await res.text()}
  }

  async stats(topic) {
    const query = topic ? `&topic=${encodeURIComponent(topic)}` : ''
    const {status, text} = await this.http('GET', `/stats?format=json${query}`)
    assert.equal(status, 200, `/stats answered ${status}: ${text}`)
    return JSON.parse(text)
  }

  async topicStats(topic) {
    const topics = (await this.stats(topic)).topics || []
    return topics.find((t) => t.topic_name === topic) || null
  }

  async channelStats(topic, channel) {
    const t = await this.topicStats(topic)
    return ((t && t.channels) || []).find((c) => c.channel_name === channel) || null
  }

  /** Polls /stats until predicate(channelStatsOrNull) holds; returns the last channel stats. */
  async waitForChannel(topic, channel, predicate, what, timeoutMs = 10000) {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const chan = await this.channelStats(topic, channel)
      if (predicate(chan)) return chan
      if (Date.now() > deadline) {
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last channel stats: ${JSON.stringify(chan)}`)
      }
      await sleep(50)
    }
  }

  /** Waits until `count` clients are subscribed to the channel, each with RDY > 0. */
  waitForConsumers(topic, channel, count) {
    return this.waitForChannel(
      topic,
      channel,
      (chan) => {
        const clients = (chan && chan.clients) || []
        return clients.length === count && clients.every((c) => c.ready_count > 0)
      },
      `${count} ready consumer(s) on ${topic}/${channel}`
    )
  }
}

/** One HTTPS request with node:https (fetch cannot take a CA): resolves with {status, text}. */
function httpsRequest(method, url, tlsOptions, body) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, {method, ...tlsOptions, agent: false, timeout: 10000}, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk) => (text += chunk))
      res.on('end', () => resolve({status: res.statusCode, text}))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error(`timed out after 10000 ms: ${method} ${url}`)))
    req.on('error', reject)
    req.end(body)
  })
}

/**
 * A throw-away PKI made with the `openssl` CLI in a temporary directory: a CA, a server
 * certificate for `localhost` and 127.0.0.1, and a client certificate (CN `knsq-test-client`),
 * both signed by the CA, plus a self-signed client certificate (`rogue`). Gives file paths (for
 * broker flags) and PEM Buffers (for nsqjs); `remove()` deletes the directory.
 */
function makeCerts() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'knsq-compat-certs-'))
  const file = (name) => path.join(dir, name)
  const openssl = (...args) => {
    try {
      execFileSync('openssl', args, {cwd: dir, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30000})
    } catch (err) {
      throw new Error(`openssl ${args.join(' ')} failed: ${err.message}\n${err.stderr || ''}`)
    }
  }
  const newKey = ['-newkey', 'rsa:2048', '-nodes']
  openssl('req', '-x509', ...newKey, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2',
    '-subj', '/CN=knsq-test-ca',
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
  const issue = (name, cn, extensions) => {
    fs.writeFileSync(file(`${name}.ext`), extensions.join('\n') + '\n')
    openssl('req', ...newKey, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`)
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key',
      '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`,
      '-days', '2', '-sha256', '-extfile', `${name}.ext`, '-out', `${name}.pem`)
  }
  const leaf = ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment']
  issue('server', 'localhost', [...leaf, 'extendedKeyUsage=serverAuth', 'subjectAltName=DNS:localhost,IP:127.0.0.1'])
  issue('client', 'knsq-test-client', [...leaf, 'extendedKeyUsage=clientAuth'])
  // A self-signed client certificate no CA vouches for.
  openssl('req', '-x509', ...newKey, '-keyout', 'rogue.key', '-out', 'rogue.pem', '-days', '2',
    '-subj', '/CN=knsq-rogue-client', ...leaf.flatMap((ext) => ['-addext', ext]),
    '-addext', 'extendedKeyUsage=clientAuth')
  return {
    dir,
    caFile: file('ca.pem'),
    serverCertFile: file('server.pem'),
    serverKeyFile: file('server.key'),
    clientCertFile: file('client.pem'),
    clientKeyFile: file('client.key'),
    ca: fs.readFileSync(file('ca.pem')),
    clientCert: fs.readFileSync(file('client.pem')),
    clientKey: fs.readFileSync(file('client.key')),
    rogueCert: fs.readFileSync(file('rogue.pem')),
    rogueKey: fs.readFileSync(file('rogue.key')),
    remove: () => fs.rmSync(dir, {recursive: true, force: true}),
  }
}

/** Collects deliveries ({message, at, reader}) and lets a test await a count of them. */
class Deliveries {
  constructor() {
    this.items = []
    this.waiters = []
  }

  add(message, reader) {
    this.items.push({message, reader, at: performance.now(), attempts: message.attempts, id: message.id, body: message.body.toString()})
    this.waiters = this.waiters.filter((w) => !w())
  }

  async waitCount(count, timeoutMs = 10000) {
    if (this.items.length < count) {
      const reached = new Promise((resolve) => {
        this.waiters.push(() => this.items.length >= count && (resolve(), true))
      })
      await within(timeoutMs, reached, `${count} deliveries (got ${this.items.length}: ${JSON.stringify(this.summary())})`).catch((err) => {
        err.message = `expected ${count} deliveries within ${timeoutMs} ms, got ${this.items.length}: ${JSON.stringify(this.summary())}`
        throw err
      })
    }
    return this.items
  }

  bodies() {
    return this.items.map((d) => d.body)
  }

  summary() {
    return this.items.map((d) => [d.body, d.attempts])
  }
}

/** nsqjs Reader that counts the NOPs it sends, i.e. the heartbeats it has answered. */
class Reader extends nsq.Reader {
  registerConnectionListeners(conn) {
    super.registerConnectionListeners(conn)
    // Every NSQDConnection it opened (its statemachine keeps the IDENTIFY response).
    this.nsqdConnections = [...(this.nsqdConnections || []), conn]
    this.heartbeatsAnswered = this.heartbeatsAnswered || 0
    const write = conn.write.bind(conn)
    conn.write = (data) => {
      if (String(data) === 'NOP\n') this.heartbeatsAnswered += 1
      return write(data)
    }
  }
}

/** Creates nsqjs clients bound to one broker and closes them all at the end of a test. */
class Clients {
  constructor(broker) {
    this.broker = broker
    this.readers = []
    this.writers = []
    this.errors = []
  }

  async writer(options = {}) {
    const [host, port] = this.broker.tcpHostPort
    const writer = new nsq.Writer(host, port, options)
    this.writers.push(writer)
    writer.on('error', (err) => this.errors.push(err))
    writer.closed = new Promise((resolve) => writer.on('closed', resolve))
    const ready = new Promise((resolve, reject) => {
      writer.once('ready', resolve)
      writer.once('closed', () => reject(new Error('writer connection closed before ready')))
    })
    writer.connect()
    await within(10000, ready, 'nsqjs Writer ready')
    return writer
  }

  /** Promisified Writer.publish: resolves when the broker answered OK. */
  publish(writer, topic, msgs) {
    return within(10000, new Promise((resolve, reject) => {
      writer.publish(topic, msgs, (err) => (err ? reject(err) : resolve()))
    }), `publish to ${topic}`)
  }

  /** Promisified Writer.deferPublish. */
  deferPublish(writer, topic, msg, delayMs) {
    return within(10000, new Promise((resolve, reject) => {
      writer.deferPublish(topic, msg, delayMs, (err) => (err ? reject(err) : resolve()))
    }), `deferPublish to ${topic}`)
  }

  /** A connected nsqjs Reader; `onMessage(message, reader)` handles each delivery. */
  reader(topic, channel, onMessage, options = {}) {
    const reader = new Reader(topic, channel, {
      nsqdTCPAddresses: [this.broker.tcpAddress],
      maxInFlight: 1,
      maxBackoffDuration: 1,
      lookupdPollInterval: 60,
      ...options,
    })
    this.readers.push(reader)
    reader.on('error', (err) => this.errors.push(err))
    reader.on('message', (message) => onMessage(message, reader))
    reader.connect()
    return reader
  }

  /** A reader that records every delivery in `deliveries` and finishes it. */
  collectingReader(topic, channel, deliveries, options = {}) {
    return this.reader(topic, channel, (message, reader) => {
      deliveries.add(message, reader)
      message.finish()
    }, options)
  }

  assertNoErrors() {
    assert.deepEqual(this.errors.map(String), [], 'nsqjs reported errors (error frames or connection errors)')
  }

  close() {
    for (const reader of this.readers) reader.close()
    for (const writer of this.writers) {
      if (writer.conn) writer.close()
    }
  }
}

/**
 * Declares a node:test test that gets a fresh broker (started with `brokerArgs`) and a Clients
 * factory. The body is bounded by TEST_TIMEOUT_MS; clients and broker are always torn down, and
 * a failure carries the tail of the broker's log.
 */
function brokerTest(name, {brokerArgs = [], httpsClient = null, timeoutMs = TEST_TIMEOUT_MS} = {}, body) {
  test(name, {timeout: timeoutMs + STARTUP_TIMEOUT_MS + 2 * STOP_TIMEOUT_MS}, () =>
    runWithBroker(name, brokerArgs, timeoutMs, body, {httpsClient})
  )
}

/** brokerTest's body: a fresh broker and clients around `body`, always torn down. */
async function runWithBroker(name, brokerArgs, timeoutMs, body, brokerOptions = {}) {
  if (!fs.existsSync(BROKER_BIN)) {
    assert.fail(`broker binary ${BROKER_BIN} not found: run \`cargo build -p broker\` or set KNSQ_BROKER_BIN`)
  }
  const broker = await new Broker(brokerArgs, brokerOptions).start()
  const clients = new Clients(broker)
  let failure = null
  try {
    await within(timeoutMs, body({broker, clients}), `test body of "${name}"`)
  } catch (err) {
    failure = err
  }
  clients.close()
  await sleep(50) // let the closes reach the broker
  const stopProblem = await broker.stop()
  if (!failure && stopProblem) failure = new Error(`knsq-broker did not stop cleanly: ${stopProblem}`)
  if (failure) {
    failure.message += `\n--- broker log (tail) ---\n${broker.logText()}`
    throw failure
  }
}

/**
 * An nsqd-style auth server on 127.0.0.1 port 0: answers every request with `answer`
 * (`{status, body}`, changeable between requests) and records each request's method, path
 * and form fields (from the query string or a POST body).
 */
class AuthServer {
  constructor(answer) {
    this.answer = answer
    this.requests = []
  }

  async start() {
    const http = require('node:http')
    this.server = http.createServer((req, res) => {
      let body = ''
      req.setEncoding('utf8')
      req.on('data', (chunk) => (body += chunk))
      req.on('end', () => {
        const url = new URL(req.url, 'http://auth')
        const form = req.method === 'POST' ? new URLSearchParams(body) : url.searchParams
        this.requests.push({method: req.method, path: url.pathname, fields: Object.fromEntries(form)})
        const {status, body: answer} = this.answer
        res.writeHead(status, {'Content-Type': 'application/json'})
        res.end(typeof answer === 'string' ? answer : JSON.stringify(answer))
      })
    })
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve))
    return this
  }

  get address() {
    return `127.0.0.1:${this.server.address().port}`
  }

  /** An answer granting `permissions` on topics and channels matching the expressions. */
  static grant(topic, channels, permissions, ttl = 3600) {
    return {
      status: 200,
      body: {ttl, identity: 'nsqjs-user', identity_url: 'http://id.example/nsqjs-user', authorizations: [{topic, channels, permissions}]},
    }
  }

  async stop() {
    this.server.closeAllConnections()
    await new Promise((resolve) => this.server.close(resolve))
  }
}

/**
 * Like brokerTest, with an AuthServer answering `answer` started first and the broker told to
 * use it (`--auth-http-address`). The body also gets {authServer}.
 */
function authTest(name, {answer, brokerArgs = [], timeoutMs = TEST_TIMEOUT_MS} = {}, body) {
  test(name, {timeout: timeoutMs + STARTUP_TIMEOUT_MS + 2 * STOP_TIMEOUT_MS}, async () => {
    const authServer = await new AuthServer(answer).start()
    try {
      const args = [`--auth-http-address=${authServer.address}`, ...brokerArgs]
      await runWithBroker(name, args, timeoutMs, (ctx) => body({...ctx, authServer}))
    } finally {
      await authServer.stop()
    }
  })
}

/**
 * A running knsq-lookupd on loopback port 0: brokers register on `grpcAddress`, clients query
 * `httpAddress` exactly as they query nsqlookupd.
 */
class Lookupd {
  constructor(args = []) {
    this.args = args
    this.log = []
    this.addresses = {}
  }

  async start() {
    const argv = ['--grpc-address=127.0.0.1:0', '--http-address=127.0.0.1:0', ...this.args]
    const patterns = {grpc: /GRPC: listening on (\S+)/, http: /HTTP: listening on (\S+)/}
    await startListening(this, LOOKUPD_BIN, argv, patterns, 'lookupd')
    return this
  }

  get grpcAddress() {
    return this.addresses.grpc
  }

  get httpAddress() {
    return this.addresses.http
  }

  logText() {
    return this.log.slice(-100).join('\n')
  }

  /** SIGTERM, then SIGKILL after STOP_TIMEOUT_MS. */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return
    this.proc.kill('SIGTERM')
    try {
      await within(STOP_TIMEOUT_MS, this.exited, 'knsq-lookupd exit after SIGTERM')
    } catch {
      this.proc.kill('SIGKILL')
      await this.exited
    }
  }

  /** `host:port` of every broker `/lookup?topic=` lists, sorted (none for an unknown topic). */
  async producers(topic) {
    const res = await fetch(`http://${this.httpAddress}/lookup?topic=${encodeURIComponent(topic)}`, {
      signal: AbortSignal.timeout(10000),
    })
    if (res.status === 404) return []
    assert.equal(res.status, 200, `/lookup answered ${res.status}`)
    const {producers} = await res.json()
    return producers.map((p) => `${p.broadcast_address}:${p.tcp_port}`).sort()
  }

  async waitForProducers(topic, want, timeoutMs = 10000) {
    const deadline = Date.now() + timeoutMs
    want = [...want].sort()
    for (;;) {
      const got = await this.producers(topic)
      if (JSON.stringify(got) === JSON.stringify(want)) return
      if (Date.now() > deadline) {
        throw new Error(`/lookup?topic=${topic} lists ${JSON.stringify(got)} after ${timeoutMs} ms, want ${JSON.stringify(want)}`)
      }
      await sleep(50)
    }
  }
}

/**
 * Declares a node:test test with one lookupd and `brokers` brokers registered with it. The
 * body gets {lookupd, brokers, readers}; every nsqjs Reader pushed to `readers` is closed, and
 * brokers and lookupd stopped, when it ends. A failure carries the tails of their logs.
 */
function clusterTest(name, {brokers: count = 3, timeoutMs = TEST_TIMEOUT_MS} = {}, body) {
  test(name, {timeout: timeoutMs + 2 * STARTUP_TIMEOUT_MS + 4 * STOP_TIMEOUT_MS}, async () => {
    for (const bin of [BROKER_BIN, LOOKUPD_BIN]) {
      if (!fs.existsSync(bin)) assert.fail(`${bin} not found: run \`cargo build -p broker -p lookupd\``)
    }
    const lookupd = await new Lookupd(['--broadcast-address=127.0.0.1']).start()
    const brokers = []
    const readers = []
    let failure = null
    try {
      for (let i = 0; i < count; i++) {
        const args = [`--lookupd-grpc-address=${lookupd.grpcAddress}`, '--broadcast-address=127.0.0.1']
        brokers.push(await new Broker(args).start())
      }
      await within(timeoutMs, body({lookupd, brokers, readers}), `test body of "${name}"`)
    } catch (err) {
      failure = err
    }
    for (const reader of readers) reader.close()
    await sleep(50)
    const problems = []
    for (const broker of brokers) {
      const problem = await broker.stop()
      if (problem) problems.push(problem)
    }
    await lookupd.stop()
    if (!failure && problems.length) failure = new Error(`knsq-broker did not stop cleanly: ${problems.join('; ')}`)
    if (failure) {
      brokers.forEach((b, i) => (failure.message += `\n--- broker ${i} log (tail) ---\n${b.logText()}`))
      failure.message += `\n--- lookupd log (tail) ---\n${lookupd.logText()}`
      throw failure
    }
  })
}

module.exports = {AuthServer, authTest, brokerTest, clusterTest, Deliveries, makeCerts, Reader, sleep, within}
