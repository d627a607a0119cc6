import type { StravaStatus } from '../useStravaTokens'

export const STATUS_TEXT: Record<StravaStatus, string> = {
  loading: 'Checking your Strava connection…',
  not_connected: 'Strava is not connected yet',
  valid: 'Strava is connected',
  expiring_soon: 'Strava token expires soon',
  expired: 'Strava token has expired',
  needs_reauth: 'Strava needs you to reconnect',
  missing: 'No Strava tokens on file',
  unavailable: 'Strava is unavailable right now',
  error: 'Could not check Strava',
}

type Tone = 'ok' | 'warn' | 'bad' | 'muted'

const TONE: Record<StravaStatus, Tone> = {
  loading: 'muted',
  not_connected: 'muted',
  valid: 'ok',
  expiring_soon: 'warn',
  expired: 'warn',
  needs_reauth: 'bad',
  missing: 'bad',
  unavailable: 'warn',
  error: 'bad',
}

/** The raw status value, colour-coded: what a support engineer would ask the user to read out. */
export function StatusPill({ status, testId }: { status: StravaStatus; testId: string }) {
  return (
    <span className={`pill pill-${TONE[status]}`} data-testid={testId}>
      {status}
    </span>
  )
}
