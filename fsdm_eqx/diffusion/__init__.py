"""Gaussian diffusion as pure functions: schedules, forward process, losses and samplers."""

from .gaussian import (
    ModelFn as ModelFn,
    PMeanVariance as PMeanVariance,
    discretized_gaussian_log_likelihood as discretized_gaussian_log_likelihood,
    normal_kl as normal_kl,
    p_mean_variance as p_mean_variance,
    predict_eps_from_x0 as predict_eps_from_x0,
    predict_x0_from_eps as predict_x0_from_eps,
    prior_bpd as prior_bpd,
    q_mean_variance as q_mean_variance,
    q_posterior_mean_variance as q_posterior_mean_variance,
    q_sample as q_sample,
    split_model_output as split_model_output,
    training_losses as training_losses,
    vlb_terms_bpd as vlb_terms_bpd,
)
from .samplers import (
    ddim_sample as ddim_sample,
    ddpm_sample as ddpm_sample,
    ode_sample as ode_sample,
    sample as sample,
)
from .schedule import (
    Schedule as Schedule,
    beta_schedule as beta_schedule,
    continuous_alpha_bar as continuous_alpha_bar,
    continuous_timestep as continuous_timestep,
    log_sigma as log_sigma,
    make_schedule as make_schedule,
    schedule_from_betas as schedule_from_betas,
    space_timesteps as space_timesteps,
)
