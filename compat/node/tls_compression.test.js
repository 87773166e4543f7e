'use strict'
// nsqjs's Writer and Reader over TLS (`tls`, `ca`, `cert`/`key`), snappy and deflate against the
// real knsq-broker started with nsqd's TLS and compression flags. nsqjs carries on with a plain
// connection whenever the broker's IDENTIFY response does not grant a feature, so every test
// checks from /stats, while the clients are connected, that the feature really was in use (and
// from the IDENTIFY response nsqjs kept). The certificates are made with the `openssl` CLI once
// for this file (see makeCerts in harness.js).

const assert = require('node:assert/strict')
const {after} = require('node:test')
const nodeTLS = require('node:tls')
const {brokerTest, Deliveries, makeCerts, sleep, within} = require('./harness')

const TOPIC = 'tls_compression_topic'
const certs = makeCerts()
after(() => certs.remove())

// With a certificate the broker also serves HTTPS, as nsqd, by default on 0.0.0.0:4152: port 0.
const serverTLS = [`--tls-cert=${certs.serverCertFile}`, `--tls-key=${certs.serverKeyFile}`, '--https-address=127.0.0.1:0']
const mutualTLS = [...serverTLS, '--tls-client-auth-policy=require-verify', `--tls-root-ca-file=${certs.caFile}`]

// nsqjs options: TLS verifying the broker against our CA; the same with a client certificate.
const tlsClient = {tls: true, tlsVerification: true, ca: certs.ca}
const mutualTLSClient = {...tlsClient, cert: certs.clientCert, key: certs.clientKey}

/** A 300 KiB body of pseudo-random letters: several snappy chunks, not trivially compressible. */
function bigBody() {
  let x = 12345
  const bytes = Buffer.alloc(300 * 1024)
  for (let i = 0; i < bytes.length; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff
    bytes[i] = 97 + (x >> 16) % 26
  }
  return bytes.toString()
}

/**
 * A Reader and a Writer with the same `options` publish (PUB, MPUB, a 300 KiB PUB) and consume
 * through the broker. Returns, read while both are still connected, the consumer's and the
 * producer's /stats entries and the IDENTIFY responses nsqjs got.
 */
async function roundTrip({broker, clients}, options) {
  const topic = TOPIC
  const deliveries = new Deliveries()
  const reader = clients.collectingReader(topic, 'ch', deliveries, options)
  await broker.waitForConsumers(topic, 'ch', 1)
  const writer = await clients.writer(options)

  const bodies = ['hello', ...Array.from({length: 5}, (_, i) => `mpub-${i} `.repeat(50)), bigBody()]
  await clients.publish(writer, topic, bodies[0])
  await clients.publish(writer, topic, bodies.slice(1, 6)) // MPUB
  await clients.publish(writer, topic, bodies[6])
  await deliveries.waitCount(bodies.length, 15000)
  await sleep(100) // a duplicate would arrive right behind
  assert.deepEqual(deliveries.bodies().sort(), [...bodies].sort())

  const chan = await broker.channelStats(topic, 'ch')
  assert.equal(chan.clients.length, 1, `one consumer expected: ${JSON.stringify(chan.clients)}`)
  const {producers} = await broker.stats()
  assert.equal((producers || []).length, 1, `one producer expected: ${JSON.stringify(producers)}`)
  clients.assertNoErrors()
  return {
    consumer: chan.clients[0],
    producer: producers[0],
    readerIdentify: reader.nsqdConnections[0].statemachine.identifyResponse,
    writerIdentify: writer.conn.statemachine.identifyResponse,
  }
}

/** Asserts a /stats client entry shows the expected TLS / snappy / deflate state. */
function assertConnection(who, client, {tls = false, snappy = false, deflate = false, tlsVersion = 'TLS1.3'}) {
  const what = `${who} /stats entry ${JSON.stringify(client)}`
  assert.equal(client.tls, tls, `tls: ${what}`)
  assert.equal(client.snappy, snappy, `snappy: ${what}`)
  assert.equal(client.deflate, deflate, `deflate: ${what}`)
  if (tls) {
    // nsqd's names: TLS1.0 … TLS1.3.
    assert.match(client.tls_version, /^TLS1\.[0-3]$/, `tls_version: ${what}`)
    assert.equal(client.tls_version, tlsVersion, `the TLS version both sides speak: ${what}`)
    // Go's (so nsqd's) suite names, e.g. TLS_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256.
    assert.match(client.tls_cipher_suite, /^TLS_[A-Z0-9_]+$/, `tls_cipher_suite: ${what}`)
  } else {
    assert.equal(client.tls_version, '', `tls_version: ${what}`)
    assert.equal(client.tls_cipher_suite, '', `tls_cipher_suite: ${what}`)
  }
  assert.equal(typeof client.tls_negotiated_protocol, 'string', `tls_negotiated_protocol: ${what}`)
  assert.equal(typeof client.tls_negotiated_protocol_is_mutual, 'boolean', `tls_negotiated_protocol_is_mutual: ${what}`)
}

/** Asserts both sides of a round trip used exactly the features in `want`. */
function assertFeatures(result, want) {
  assertConnection('consumer', result.consumer, want)
  assertConnection('producer', result.producer, want)
  for (const [who, identify] of [['Reader', result.readerIdentify], ['Writer', result.writerIdentify]]) {
    const what = `${who}'s IDENTIFY response ${JSON.stringify(identify)}`
    assert.equal(identify.tls_v1, Boolean(want.tls), `tls_v1: ${what}`)
    assert.equal(identify.snappy, Boolean(want.snappy), `snappy: ${what}`)
    assert.equal(identify.deflate, Boolean(want.deflate), `deflate: ${what}`)
  }
}

// The TLS alerts (as Node's OpenSSL words them) for a missing client certificate and for one
// no trusted CA signed; Go's nsqd may send "bad certificate" for either.
const NO_CERTIFICATE_ALERT = /alert (certificate required|bad certificate)/
const UNTRUSTED_CERTIFICATE_ALERT = /alert (unknown ca|bad certificate)/

/** A Writer that must not get ready: resolves with the errors it reported. */
async function writerRefused(clients, options) {
  const before = clients.errors.length
  await assert.rejects(clients.writer(options), /closed before ready|timed out/)
  return clients.errors.slice(before).map(String)
}

brokerTest('TLS: a Writer and a Reader verifying the broker certificate', {brokerArgs: serverTLS}, async (ctx) => {
  const result = await roundTrip(ctx, tlsClient)
  assertFeatures(result, {tls: true})
})

brokerTest('TLS: a client without tls_v1 still gets a plain connection', {brokerArgs: serverTLS}, async (ctx) => {
  assertFeatures(await roundTrip(ctx, {}), {})
})

brokerTest('TLS: a client asking for TLS from a broker without a certificate gets a plain connection', {}, async (ctx) => {
  assertFeatures(await roundTrip(ctx, tlsClient), {})
})

brokerTest('mutual TLS (require-verify): clients with a CA-signed certificate work',
  {brokerArgs: mutualTLS, httpsClient: {ca: certs.ca, cert: certs.clientCert, key: certs.clientKey}},
  async (ctx) => {
    const result = await roundTrip(ctx, mutualTLSClient)
    assertFeatures(result, {tls: true})
  })

/**
 * A Writer and a Reader with `options` are refused during the TLS upgrade: the Writer never
 * gets ready, the Reader never subscribes, and both report the TLS alert matching `alert`.
 */
async function assertTLSRefused({broker, clients}, options, alert) {
  const errors = await writerRefused(clients, options)
  assert.match(errors.join('\n'), alert, 'the refused Writer reported no such TLS alert')

  const before = clients.errors.length
  const reader = clients.reader(TOPIC, 'ch', (message) => message.finish(), options)
  let ready = false
  reader.on('ready', () => (ready = true))
  const deadline = Date.now() + 5000
  while (clients.errors.length === before && Date.now() < deadline) await sleep(50)
  assert.ok(clients.errors.length > before, 'the refused Reader reported no error within 5 s')
  assert.match(clients.errors.slice(before).map(String).join('\n'), alert, 'the refused Reader reported no such TLS alert')
  assert.equal(ready, false, 'the refused Reader became ready')
  reader.close()

  const chan = await broker.channelStats(TOPIC, 'ch')
  assert.equal(((chan && chan.clients) || []).length, 0, `no consumer expected: ${JSON.stringify(chan)}`)
  const {producers} = await broker.stats()
  assert.deepEqual(producers || [], [], 'no producer expected')
}

brokerTest('mutual TLS (require-verify): clients without a certificate or with a self-signed one are refused',
  {brokerArgs: mutualTLS, httpsClient: {ca: certs.ca, cert: certs.clientCert, key: certs.clientKey}, timeoutMs: 60000},
  async ({broker, clients}) => {
    await assertTLSRefused({broker, clients}, tlsClient, NO_CERTIFICATE_ALERT)
    await assertTLSRefused({broker, clients}, {...tlsClient, cert: certs.rogueCert, key: certs.rogueKey}, UNTRUSTED_CERTIFICATE_ALERT)

    // A plain client: a client-auth policy makes TLS required, so its first PUB is refused.
    const plain = await clients.writer()
    await assert.rejects(clients.publish(plain, TOPIC, 'plain'), /E_INVALID cannot PUB in current state \(TLS required\)/)
    assert.equal(await broker.topicStats(TOPIC), null)
  })

brokerTest('mutual TLS (require): any client certificate is accepted, none is refused',
  {brokerArgs: [...serverTLS, '--tls-client-auth-policy=require'],
    httpsClient: {ca: certs.ca, cert: certs.rogueCert, key: certs.rogueKey}, timeoutMs: 60000},
  async ({broker, clients}) => {
    await assertTLSRefused({broker, clients}, tlsClient, NO_CERTIFICATE_ALERT)
    clients.errors.length = 0 // the refusals above are expected
    const result = await roundTrip({broker, clients}, {...tlsClient, cert: certs.rogueCert, key: certs.rogueKey})
    assertFeatures(result, {tls: true})
  })

brokerTest('snappy: a Writer and a Reader', {}, async (ctx) => {
  assertFeatures(await roundTrip(ctx, {snappy: true}), {snappy: true})
})

brokerTest('deflate at level 3: a Writer and a Reader', {}, async (ctx) => {
  const result = await roundTrip(ctx, {deflate: true, deflateLevel: 3})
  assertFeatures(result, {deflate: true})
  // /stats has no level (nsqd's has none either); the IDENTIFY response has the one in use.
  for (const identify of [result.readerIdentify, result.writerIdentify]) {
    assert.equal(identify.deflate_level, 3, JSON.stringify(identify))
    assert.equal(identify.max_deflate_level, 6, JSON.stringify(identify))
  }
})

brokerTest('deflate: the level is clamped to --max-deflate-level', {brokerArgs: ['--max-deflate-level=2']}, async (ctx) => {
  const result = await roundTrip(ctx, {deflate: true, deflateLevel: 9})
  assertFeatures(result, {deflate: true})
  for (const identify of [result.readerIdentify, result.writerIdentify]) {
    assert.equal(identify.deflate_level, 2, JSON.stringify(identify))
    assert.equal(identify.max_deflate_level, 2, JSON.stringify(identify))
  }
})

brokerTest('TLS + snappy: a Writer and a Reader', {brokerArgs: serverTLS}, async (ctx) => {
  assertFeatures(await roundTrip(ctx, {...tlsClient, snappy: true}), {tls: true, snappy: true})
})

brokerTest('TLS + deflate: a Writer and a Reader', {brokerArgs: serverTLS}, async (ctx) => {
  const result = await roundTrip(ctx, {...tlsClient, deflate: true, deflateLevel: 5})
  assertFeatures(result, {tls: true, deflate: true})
  assert.equal(result.writerIdentify.deflate_level, 5)
})

brokerTest('mutual TLS + snappy: a Writer and a Reader with certificates',
  {brokerArgs: mutualTLS, httpsClient: {ca: certs.ca, cert: certs.clientCert, key: certs.clientKey}},
  async (ctx) => {
    assertFeatures(await roundTrip(ctx, {...mutualTLSClient, snappy: true}), {tls: true, snappy: true})
  })

/** Runs `body` with Node's TLS clients (so nsqjs's) limited to TLS 1.2. */
async function withClientsAtMostTLS12(body) {
  const saved = nodeTLS.DEFAULT_MAX_VERSION
  nodeTLS.DEFAULT_MAX_VERSION = 'TLSv1.2'
  try {
    return await body()
  } finally {
    nodeTLS.DEFAULT_MAX_VERSION = saved
  }
}

brokerTest('TLS 1.2: a client that cannot speak TLS 1.3 works by default', {brokerArgs: serverTLS}, async (ctx) => {
  const result = await withClientsAtMostTLS12(() => roundTrip(ctx, tlsClient))
  assertFeatures(result, {tls: true, tlsVersion: 'TLS1.2'})
})

brokerTest('--tls-min-version=tls1.3: a client that cannot speak TLS 1.3 is refused',
  {brokerArgs: [...serverTLS, '--tls-min-version=tls1.3'], timeoutMs: 60000}, async (ctx) => {
    await withClientsAtMostTLS12(() => assertTLSRefused(ctx, tlsClient, /alert protocol version|unsupported protocol/))
    ctx.clients.errors.length = 0 // the refusals above are expected
    assertFeatures(await roundTrip(ctx, tlsClient), {tls: true})
  })

for (const [name, options, want] of [
  ['snappy', {snappy: true}, {snappy: true}],
  ['deflate', {deflate: true}, {deflate: true}],
  ['TLS + deflate', {...tlsClient, deflate: true}, {tls: true, deflate: true}],
  ['TLS + snappy', {...tlsClient, snappy: true}, {tls: true, snappy: true}],
]) {
  brokerTest(`${name}: heartbeats flow both ways on an idle connection`, {brokerArgs: serverTLS}, async ({broker, clients}) => {
    const deliveries = new Deliveries()
    const reader = clients.collectingReader(TOPIC, 'ch', deliveries, {...options, heartbeatInterval: 1})
    let readerClosed = false
    reader.on('nsqd_closed', () => { readerClosed = true })
    await broker.waitForConsumers(TOPIC, 'ch', 1)
    const writer = await clients.writer({...options, heartbeatInterval: 1})
    let writerClosed = false
    writer.closed.then(() => { writerClosed = true })
    const {producers} = await broker.stats()
    assert.deepEqual(producers || [], [], 'a Writer that has not published is no producer yet')

    // Idle for longer than the 2 s the broker waits for an answered heartbeat: the heartbeats
    // must be flushed through the compressor to the client, and its NOPs back.
    await sleep(3500)
    assert.ok(reader.heartbeatsAnswered >= 2, `${reader.heartbeatsAnswered} heartbeats answered in 3.5 s at a 1 s interval`)
    assert.equal(readerClosed, false, 'the idle reader connection was closed')
    assert.equal(writerClosed, false, 'the idle writer connection was closed')

    await clients.publish(writer, TOPIC, 'still here')
    await deliveries.waitCount(1)
    assert.deepEqual(deliveries.bodies(), ['still here'])
    const chan = await broker.channelStats(TOPIC, 'ch')
    assertConnection('consumer', chan.clients[0], want)
    assertConnection('producer', (await broker.stats()).producers[0], want)
    clients.assertNoErrors()
  })
}

brokerTest('--tls-required=true: plain clients are refused, TLS clients work',
  {brokerArgs: [...serverTLS, '--tls-required=true'], httpsClient: {ca: certs.ca}},
  async ({broker, clients}) => {
    // Plain HTTP is refused too (nsqd: 403 {"message":"TLS_REQUIRED","https_port":N}).
    const {status, text} = await broker.plainHttp('GET', '/stats?format=json')
    assert.equal(status, 403, text)
    const httpsPort = Number(broker.addresses.https.slice(broker.addresses.https.lastIndexOf(':') + 1))
    assert.deepEqual(JSON.parse(text), {message: 'TLS_REQUIRED', https_port: httpsPort})

    const plain = await clients.writer()
    await assert.rejects(clients.publish(plain, TOPIC, 'plain'), (err) => {
      assert.equal(err.message, 'E_INVALID cannot PUB in current state (TLS required)')
      return true
    })
    await within(5000, plain.closed, 'the broker to close the plain Writer after the fatal error')

    const plainReaderErrors = clients.errors.length
    const plainReader = clients.reader(TOPIC, 'plain', (message) => message.finish())
    const deadline = Date.now() + 5000
    while (!clients.errors.slice(plainReaderErrors).some((e) => /TLS required/.test(e)) && Date.now() < deadline) {
      await sleep(50)
    }
    assert.match(clients.errors.slice(plainReaderErrors).map(String).join('\n'),
      /E_INVALID cannot SUB in current state \(TLS required\)/)
    assert.equal(await broker.topicStats(TOPIC), null, 'nothing was published or subscribed in plain')
    plainReader.close()
    await sleep(100)
    clients.errors.length = 0 // the refusals above are expected

    assertFeatures(await roundTrip({broker, clients}, tlsClient), {tls: true})
  })

brokerTest('--tls-required=tcp-https: plain TCP is refused, plain HTTP is allowed',
  {brokerArgs: [...serverTLS, '--tls-required=tcp-https']},
  async ({broker, clients}) => {
    const plain = await clients.writer()
    await assert.rejects(clients.publish(plain, TOPIC, 'plain'), /E_INVALID cannot PUB in current state \(TLS required\)/)
    await within(5000, plain.closed, 'the broker to close the plain Writer after the fatal error')
    assert.equal(await broker.topicStats(TOPIC), null)
    clients.errors.length = 0 // the refusal above is expected
    assertFeatures(await roundTrip({broker, clients}, tlsClient), {tls: true})
  })

brokerTest('--snappy=false: a client asking for snappy gets a plain connection that works',
  {brokerArgs: ['--snappy=false']}, async (ctx) => {
    assertFeatures(await roundTrip(ctx, {snappy: true}), {})
  })

brokerTest('--deflate=false: a client asking for deflate gets a plain connection that works',
  {brokerArgs: ['--deflate=false']}, async (ctx) => {
    assertFeatures(await roundTrip(ctx, {deflate: true}), {})
  })
